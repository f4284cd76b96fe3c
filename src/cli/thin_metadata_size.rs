//! thin_metadata_size: estimate the metadata device size for a pool, with
//! the peer's formula, options and output.

use std::ffi::OsString;

use clap::{Arg, Command};

use super::*;
use crate::thin::metadata_size::{estimate, format_size, parse_size, Style, Unit};

fn command(name: &'static str) -> Command {
    Command::new(name)
        .about("Estimate the size of the metadata device needed for a given configuration.")
        .disable_version_flag(true)
        .arg(
            Arg::new("block-size")
                .short('b')
                .long("block-size")
                .value_name("SIZE[bskmg]")
                .required(true)
                .help("Specify the data block size (sectors without a unit)"),
        )
        .arg(
            Arg::new("pool-size")
                .short('s')
                .long("pool-size")
                .value_name("SIZE[bskmgtp]")
                .required(true)
                .help("Specify the size of pool device (sectors without a unit)"),
        )
        .arg(
            Arg::new("max-thins")
                .short('m')
                .long("max-thins")
                .value_name("NUM")
                .required(true)
                .help("Maximum number of thin devices and snapshots"),
        )
        .arg(
            Arg::new("numeric-only")
                .short('n')
                .long("numeric-only")
                .value_name("OPT")
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("")
                .help("Output numeric value only; =short or =long appends the unit"),
        )
        .arg(quiet_arg().help("Accepted for uniformity with the other tools; no effect"))
        .arg(
            Arg::new("unit")
                .short('u')
                .long("unit")
                .value_name("UNIT")
                .default_value("sector")
                .help("Specify the output unit in {bskKmMgG}"),
        )
        .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let usage = |opt: &str, e: String| Failure::new(EXIT_USAGE, format!("--{opt}: {e}"));
    let size = |opt: &str| parse_size(m.get_one::<String>(opt).unwrap()).map_err(|e| usage(opt, e));
    let block_size = size("block-size")?;
    let pool_size = size("pool-size")?;
    let max_thins =
        parse_u64(m.get_one::<String>("max-thins").unwrap()).map_err(|e| usage("max-thins", e))?;
    let unit_s = m.get_one::<String>("unit").unwrap();
    let unit =
        Unit::parse(unit_s).ok_or_else(|| usage("unit", format!("unknown unit '{unit_s}'")))?;
    let style = match m.get_one::<String>("numeric-only").map(String::as_str) {
        None => Style::Full,
        Some("") => Style::Numeric,
        Some("short") => Style::ShortUnit,
        Some("long") => Style::LongUnit,
        Some(other) => {
            return Err(usage(
                "numeric-only",
                format!("'{other}' is neither short nor long"),
            ))
        }
    };
    let bytes =
        estimate(block_size, pool_size, max_thins).map_err(|e| Failure::new(EXIT_USAGE, e))?;
    println!("{}", format_size(bytes, unit, style));
    Ok(())
}
