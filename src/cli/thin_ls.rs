//! thin_ls: list the thin devices of a pool with their usage, as the peer's
//! table.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use clap::{Arg, ArgAction, Command};

use super::progress::Progress;
use super::*;
use crate::thin::ls::{list, render, Field, ALL_FIELDS, DEFAULT_FIELDS};

fn command(name: &'static str) -> Command {
    Command::new(name)
        .about("List thin volumes within a pool")
        .disable_version_flag(true)
        .arg(
            Arg::new("INPUT")
                .help("Specify the input device")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf)),
        )
        .arg(
            Arg::new("format")
                .short('o')
                .long("format")
                .value_name("FIELDS")
                .help(
                    "Give a comma separated list of fields to be output \
                     (default DEV,MAPPED,CREATE_TIME,SNAP_TIME)",
                ),
        )
        .arg(
            Arg::new("metadata-snap")
                .short('m')
                .long("metadata-snap")
                .action(ArgAction::SetTrue)
                .help("Use metadata snapshot"),
        )
        .arg(
            Arg::new("no-headers")
                .long("no-headers")
                .action(ArgAction::SetTrue)
                .help("Don't output headers"),
        )
        .arg(quiet_arg().help("Do not show a progress bar"))
        .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

/// Parse `--format`: comma-separated field names.
fn parse_fields(s: &str) -> Result<Vec<Field>, Failure> {
    s.split(',')
        .map(|f| {
            Field::parse(f).ok_or_else(|| {
                let valid: Vec<&str> = ALL_FIELDS.iter().map(|(n, _)| *n).collect();
                Failure::new(
                    EXIT_USAGE,
                    format!(
                        "--format: unknown field '{f}' (valid fields: {})",
                        valid.join(", ")
                    ),
                )
            })
        })
        .collect()
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let input = m.get_one::<PathBuf>("INPUT").unwrap();
    let fields = match m.get_one::<String>("format") {
        Some(s) => parse_fields(s)?,
        None => DEFAULT_FIELDS.to_vec(),
    };
    let metadata_snap = m.get_flag("metadata-snap");
    // Live metadata is opened exclusively; a metadata snapshot is meant to
    // be read while the pool runs.
    let mode = if metadata_snap {
        OpenMode::ReadOnly
    } else {
        OpenMode::ReadOnlyExclusive
    };
    let dev = open_device(input, mode)?;
    let counting = fields.iter().any(|f| f.needs_mappings());
    let mut progress = Progress::new("Scanning data mappings", m.get_flag("quiet"), true);
    let listing = list(&dev, metadata_snap, counting, &mut |d, t| {
        progress.update(d, t)
    });
    progress.finish();
    let listing = listing.map_err(|e| thin_failure(input, &e))?;

    let mut out = std::io::stdout().lock();
    render(&mut out, &fields, !m.get_flag("no-headers"), &listing)
        .and_then(|()| out.flush())
        .map_err(|e| Failure::new(EXIT_IO, format!("writing output: {e}")))
}
