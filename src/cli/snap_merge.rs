//! snap_merge: merge a dm-snapshot persistent exception store back into its
//! origin offline, as the kernel's snapshot-merge target does (same order,
//! same commits), so that it can be interrupted and rerun at any point.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Arg, ArgAction, Command};

use super::progress::Progress;
use super::snap_dump::{open_snap_device, snap_failure};
use super::*;
use crate::snapshot::dev::{same_file, Access};
use crate::snapshot::merge::{merge, Options};

fn command(name: &'static str) -> Command {
    Command::new(name)
        .about("Merge a dm-snapshot COW store into its origin, offline and crash-safe")
        .disable_version_flag(true)
        .arg(
            Arg::new("origin")
                .long("origin")
                .value_name("ORIGIN")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("The origin device (written)"),
        )
        .arg(
            Arg::new("cow")
                .long("cow")
                .value_name("COW")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("The snapshot's COW device (its table is emptied as chunks are merged)"),
        )
        .arg(
            Arg::new("dry-run")
                .long("dry-run")
                .action(ArgAction::SetTrue)
                .help("Print what would be copied; write nothing"),
        )
        .arg(quiet_arg())
        .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), |m| run(name, m))
}

fn run(tool: &str, m: &clap::ArgMatches) -> Result<(), Failure> {
    let origin_path = m.get_one::<PathBuf>("origin").unwrap();
    let cow_path = m.get_one::<PathBuf>("cow").unwrap();
    let quiet = m.get_flag("quiet");
    let dry_run = m.get_flag("dry-run");
    if same_file(origin_path, cow_path) {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "{}: the origin and the COW are the same device",
                origin_path.display()
            ),
        ));
    }
    let access = if dry_run {
        Access::ReadExclusive
    } else {
        Access::WriteExclusive
    };
    let cow = open_snap_device(cow_path, access)?;
    let origin = open_snap_device(origin_path, access)?;
    let cow_name = cow_path.display().to_string();
    let origin_name = origin_path.display().to_string();
    let opts = Options {
        dry_run,
        ..Options::default()
    };
    let mut progress = Progress::new("Merging", quiet || dry_run, true);
    let out = merge(
        &origin,
        &origin_name,
        &cow,
        &cow_name,
        &opts,
        &mut |s| {
            if dry_run {
                let range = |a: u64| {
                    if s.len == 1 {
                        a.to_string()
                    } else {
                        format!("{}-{}", a, a + s.len - 1)
                    }
                };
                println!(
                    "area {} record{} {}: copy COW chunk{} {} to origin chunk{} {} ({} bytes)",
                    s.area,
                    if s.len == 1 { "" } else { "s" },
                    range(s.first_record),
                    if s.len == 1 { "" } else { "s" },
                    range(s.new),
                    if s.len == 1 { "" } else { "s" },
                    range(s.old),
                    s.bytes
                );
            }
        },
        &mut |d, t| progress.update(d, t),
    );
    progress.finish();
    let out = out.map_err(|e| snap_failure(&e))?;
    if !quiet {
        for n in &out.notes {
            eprintln!("{tool}: {cow_name}: note: {n}");
        }
    }
    if dry_run {
        println!(
            "would merge {} exception(s) in {} step(s): {} bytes from {} into {}",
            out.exceptions, out.steps, out.bytes, cow_name, origin_name
        );
    }
    Ok(())
}
