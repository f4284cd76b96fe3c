//! snap_check: check a dm-snapshot persistent exception store (COW device);
//! exit 0 only when it is sound.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Arg, Command};

use super::snap_dump::{open_snap_device, snap_failure};
use super::*;
use crate::snapshot::check::{check, Kind, KEEP_PER_KIND};
use crate::snapshot::cow::CowStore;
use crate::snapshot::dev::{Access, Store};

fn command(name: &'static str) -> Command {
    Command::new(name)
        .about("Check a dm-snapshot persistent exception store (COW device)")
        .disable_version_flag(true)
        .arg(
            Arg::new("COW")
                .help("The COW device or image to check")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf)),
        )
        .arg(
            Arg::new("origin")
                .long("origin")
                .value_name("ORIGIN")
                .value_parser(clap::value_parser!(PathBuf))
                .help("The origin device: also check that every exception lies within it"),
        )
        .arg(quiet_arg())
        .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), |m| run(name, m))
}

fn run(tool: &str, m: &clap::ArgMatches) -> Result<i32, Failure> {
    let input = m.get_one::<PathBuf>("COW").unwrap();
    let quiet = m.get_flag("quiet");
    let dev = open_snap_device(input, Access::ReadExclusive)?;
    // Only the origin's size is needed: a shared open.
    let origin_bytes = match m.get_one::<PathBuf>("origin") {
        Some(p) => Some(open_snap_device(p, Access::Read)?.size()),
        None => None,
    };
    let name = input.display().to_string();
    let store = CowStore::open(&dev, &name).map_err(|e| snap_failure(&e))?;
    let rep = check(&store, origin_bytes).map_err(|e| snap_failure(&e))?;
    if quiet {
        return Ok(if rep.is_sound() {
            EXIT_OK
        } else {
            EXIT_DAMAGED
        });
    }
    let layout = rep.layout;
    let usage = rep.table.usage(&layout);
    println!("CHUNK_SIZE={}", layout.chunk_sectors);
    println!("EXCEPTIONS={}", rep.table.exceptions);
    println!("AREAS={}", rep.table.areas.len());
    println!(
        "SPACE_USED={}/{} {}",
        usage.allocated_sectors, usage.total_sectors, usage.metadata_sectors
    );
    for f in &rep.findings {
        eprintln!("{tool}: {name}: {f}");
    }
    for kind in Kind::ALL {
        let n = rep.count(kind);
        if n > KEEP_PER_KIND as u64 {
            eprintln!(
                "{tool}: {name}: ... and {} more: {}",
                n - KEEP_PER_KIND as u64,
                kind.describe()
            );
        }
    }
    if let Some((at, e)) = rep.clipped {
        eprintln!(
            "{tool}: {name}: note: {at}: origin chunk {} is the origin's last, partial chunk (a merge copies it up to the origin's end)",
            e.old
        );
    }
    if rep.is_sound() {
        return Ok(EXIT_OK);
    }
    let summary: Vec<String> = Kind::ALL
        .iter()
        .filter(|k| rep.count(**k) > 0)
        .map(|k| format!("{} {}", rep.count(*k), k.describe()))
        .collect();
    eprintln!(
        "{tool}: {name}: check failed: {} problem(s): {}",
        rep.total(),
        summary.join(", ")
    );
    Ok(EXIT_DAMAGED)
}
