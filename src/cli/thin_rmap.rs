//! thin_rmap: reverse map of data block ranges to thin devices' virtual
//! blocks, as the peer prints it.

use std::ffi::OsString;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use clap::{Arg, ArgAction, Command};

use super::*;
use crate::thin::rmap::{parse_region, rmap};

fn command(name: &'static str) -> Command {
    Command::new(name)
        .about("Output reverse map of a thin provisioned region of blocks")
        .disable_version_flag(true)
        .arg(
            Arg::new("INPUT")
                .help("Specify the input device")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf)),
        )
        .arg(quiet_arg().help("Accepted for uniformity with the other tools; no effect"))
        .arg(
            Arg::new("region")
                .long("region")
                .value_name("BLOCK_RANGE")
                .required(true)
                .action(ArgAction::Append)
                .allow_hyphen_values(true)
                .help(
                    "Specify range of blocks on the data device: BEGIN..END, END excluded \
                     (can be given more than once)",
                ),
        )
        .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let input = m.get_one::<PathBuf>("INPUT").unwrap();
    let regions = m
        .get_many::<String>("region")
        .into_iter()
        .flatten()
        .map(|s| parse_region(s).map_err(|e| Failure::new(EXIT_USAGE, format!("--region: {e}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let dev = open_device(input, OpenMode::ReadOnlyExclusive)?;
    let runs = rmap(&dev, &regions).map_err(|e| thin_failure(input, &e))?;

    let mut out = BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    let mut write = || -> std::io::Result<()> {
        for r in &runs {
            writeln!(out, "{r}")?;
        }
        out.flush()
    };
    write().map_err(|e| Failure::new(EXIT_IO, format!("writing output: {e}")))
}
