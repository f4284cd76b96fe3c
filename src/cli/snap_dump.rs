//! snap_dump: list a dm-snapshot persistent exception store (COW device):
//! header, space used, metadata areas, and the exceptions as runs, as
//! human-readable text, XML or JSON.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use clap::{Arg, Command};

use super::*;
use crate::snapshot::cow::CowStore;
use crate::snapshot::dev::{Access, Device};
use crate::snapshot::dump::{dump, Format};
use crate::snapshot::Error as SnapError;

fn command(name: &'static str) -> Command {
    Command::new(name)
        .about("List a dm-snapshot persistent exception store (COW device)")
        .disable_version_flag(true)
        .arg(
            Arg::new("COW")
                .help("The COW device or image to list")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf)),
        )
        .arg(
            Arg::new("format")
                .short('f')
                .long("format")
                .value_name("TYPE")
                .help("Output format: human (default), xml, json"),
        )
        .arg(
            Arg::new("output")
                .short('o')
                .long("output")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Write to FILE instead of stdout"),
        )
        .arg(quiet_arg())
        .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let input = m.get_one::<PathBuf>("COW").unwrap();
    let format = match m.get_one::<String>("format").map(String::as_str) {
        None | Some("human") | Some("human_readable") => Format::Human,
        Some("xml") => Format::Xml,
        Some("json") => Format::Json,
        Some(other) => {
            return Err(Failure::new(
                EXIT_USAGE,
                format!("unknown format '{other}' (use human, xml or json)"),
            ))
        }
    };
    let dev = open_snap_device(input, Access::ReadExclusive)?;
    let output = m.get_one::<PathBuf>("output");
    if let Some(o) = output {
        if crate::snapshot::dev::same_file(input, o) {
            return Err(Failure::new(
                EXIT_USAGE,
                format!(
                    "{}: the output is the COW device itself; refusing to overwrite it",
                    o.display()
                ),
            ));
        }
    }
    let name = input.display().to_string();
    let store = CowStore::open(&dev, &name).map_err(|e| snap_failure(&e))?;
    let sink: Box<dyn Write> = match output {
        Some(p) => Box::new(File::create(p).map_err(|e| {
            Failure::new(
                EXIT_IO,
                format!("{}: cannot create output: {e}", p.display()),
            )
        })?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut w = BufWriter::with_capacity(1 << 20, sink);
    dump(&store, format, &mut w).map_err(|e| snap_failure(&e))
}

/// Open a snapshot device (COW or origin), naming it in failures.
pub(crate) fn open_snap_device(path: &Path, access: Access) -> Result<Device, Failure> {
    Device::open(path, access).map_err(|e| open_failure(path, e))
}

/// Exit code and message for a snapshot library error (it names the device).
pub(crate) fn snap_failure(e: &SnapError) -> Failure {
    let code = match e {
        SnapError::Io { .. } | SnapError::Output(_) => EXIT_IO,
        SnapError::TooSmall { .. } | SnapError::OriginTooSmall { .. } => EXIT_NO_INPUT,
        SnapError::Header { .. }
        | SnapError::AreaTruncated { .. }
        | SnapError::Invalid { .. }
        | SnapError::Corrupt { .. } => EXIT_DAMAGED,
    };
    Failure::new(code, e.to_string())
}
