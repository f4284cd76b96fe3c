//! thin_repair: rebuild damaged thin metadata onto another device.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Arg, Command};

use super::progress::Progress;
use super::*;
use crate::thin::restore::BuildError;

fn command(name: &'static str) -> Command {
    Command::new(name)
        .about("Repair thin-provisioning metadata, and write it to different device or file")
        .disable_version_flag(true)
        .arg(
            Arg::new("input")
                .short('i')
                .long("input")
                .value_name("FILE")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("Specify the input device"),
        )
        .arg(
            Arg::new("output")
                .short('o')
                .long("output")
                .value_name("FILE")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("Specify the output device"),
        )
        .arg(quiet_arg())
        .arg(
            Arg::new("transaction-id")
                .long("transaction-id")
                .value_name("NUM")
                .help("Override the transaction id if needed"),
        )
        .arg(
            Arg::new("data-block-size")
                .long("data-block-size")
                .value_name("SECTORS")
                .help("Provide the data block size for repairing"),
        )
        .arg(
            Arg::new("nr-data-blocks")
                .long("nr-data-blocks")
                .value_name("NUM")
                .help("Override the number of data blocks if needed"),
        )
        .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    let m = match parse_args(command(name), args) {
        Ok(m) => m,
        Err(code) => return code,
    };
    match run(&m) {
        Ok(()) => EXIT_OK,
        Err(f) => report(name, f),
    }
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let input = m.get_one::<PathBuf>("input").unwrap();
    let output = m.get_one::<PathBuf>("output").unwrap();
    let quiet = m.get_flag("quiet");
    let overrides = thin_restore::overrides(m)?;
    if thin_dump::same_file(input, output) {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "{}: the output is the input itself; repair writes to another device",
                output.display()
            ),
        ));
    }
    let src = open_device(input, OpenMode::ReadOnlyExclusive)?;
    let dst = open_device(output, OpenMode::ReadWriteExclusive)?;
    let mut progress = Progress::new("Scanning", quiet, true);
    let found =
        crate::thin::repair::find_source(&src, overrides, &mut |d, t| progress.update(d, t));
    progress.finish();
    let r = found
        .map_err(crate::thin::repair::input_error)
        .and_then(|source| {
            if !quiet {
                for n in &source.notes {
                    eprintln!("thin_repair: {}: {n}", input.display());
                }
            }
            crate::thin::repair::write_repaired(&src, &source, &dst)
        });
    match r {
        Ok(_) => Ok(()),
        Err(BuildError::InputIo(msg)) => {
            Err(Failure::new(EXIT_IO, format!("{}: {msg}", input.display())))
        }
        Err(BuildError::Input(msg)) => Err(Failure::new(
            EXIT_DAMAGED,
            format!("{}: {msg}", input.display()),
        )),
        Err(e @ BuildError::TooSmall { .. }) => Err(Failure::new(
            EXIT_NO_INPUT,
            format!("{}: too small: {e} (nothing was written)", output.display()),
        )),
        Err(BuildError::Metadata(e)) => Err(Failure::new(
            if e.is_io() { EXIT_IO } else { EXIT_INTERNAL },
            format!("{}: {e}", output.display()),
        )),
    }
}
