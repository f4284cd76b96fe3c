//! thin_trim: discard the free data blocks of an inactive pool.

use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;

use clap::{Arg, ArgAction, Command};

use super::progress::Progress;
use super::thin_merge::{merge_failure, open_file, same_file, Access};
use super::*;
use crate::thin::merge::MergeError;
use crate::thin::trim::{discard_runs, plan_trim};

fn command(name: &'static str) -> Command {
    let dev = |id: &'static str, help: &'static str| {
        Arg::new(id)
            .long(id)
            .value_name("FILE")
            .required(true)
            .value_parser(clap::value_parser!(PathBuf))
            .help(help)
    };
    Command::new(name)
        .about("Issue discard requests for free pool space (offline tool).")
        .disable_version_flag(true)
        .arg(dev("data-dev", "Specify the pool data device"))
        .arg(dev("metadata-dev", "Specify the pool metadata device"))
        .arg(
            // thin-provisioning-tools 0.x required it; accepted and ignored
            // (the metadata is always opened exclusively: a live pool is
            // refused).
            Arg::new("pool-inactive")
                .long("pool-inactive")
                .action(ArgAction::SetTrue)
                .hide(true),
        )
        .arg(quiet_arg())
        .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let meta_path = m.get_one::<PathBuf>("metadata-dev").unwrap();
    let data_path = m.get_one::<PathBuf>("data-dev").unwrap();
    let quiet = m.get_flag("quiet");
    if same_file(meta_path, data_path) {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "{}: the metadata and data devices are the same; nothing was discarded",
                data_path.display()
            ),
        ));
    }

    // The pool must be inactive: exclusive opens refuse a device a live
    // pool holds. The metadata is only read.
    let meta = open_device(meta_path, OpenMode::ReadOnlyExclusive)?;
    let data = open_file(data_path, Access::Write, true)?;
    let is_block_device = std::fs::metadata(data_path)
        .map(|md| md.file_type().is_block_device())
        .unwrap_or(false);

    let mut progress = Progress::new("Checking metadata", quiet, true);
    let plan = plan_trim(&meta, &mut |d, t| progress.update(d, t));
    progress.finish();
    let plan = plan.map_err(|e| merge_failure(meta_path, e))?;

    let needed = plan.nr_data_blocks.saturating_mul(plan.data_block_bytes);
    if data.size < needed {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "{}: {} bytes, smaller than the pool's {} data blocks of {} bytes ({needed} bytes): not this pool's data device? nothing was discarded",
                data_path.display(),
                data.size,
                plan.nr_data_blocks,
                plan.data_block_bytes
            ),
        ));
    }

    let mut progress = Progress::new("Discarding", quiet, true);
    let r = discard_runs(&data.file, is_block_device, &plan, &mut |d, t| {
        progress.update(d, t)
    });
    progress.finish();
    r.map_err(|e| match e {
        MergeError::Io { what, source } => {
            let code = match source.raw_os_error() {
                Some(libc::EOPNOTSUPP) => EXIT_NO_INPUT,
                _ => EXIT_IO,
            };
            Failure::new(code, format!("{}: {what}: {source}", data_path.display()))
        }
        e => merge_failure(meta_path, e),
    })?;

    if !quiet {
        println!(
            "{}: discarded {} free data block{} in {} range{} ({} bytes)",
            data_path.display(),
            plan.free_blocks,
            if plan.free_blocks == 1 { "" } else { "s" },
            plan.runs.len(),
            if plan.runs.len() == 1 { "" } else { "s" },
            plan.free_blocks * plan.data_block_bytes,
        );
        if plan.leaked_blocks > 0 {
            println!(
                "{}: {} leaked data block{} (counted in use, mapped by no device) left alone; thin_check --auto-repair frees them",
                data_path.display(),
                plan.leaked_blocks,
                if plan.leaked_blocks == 1 { "" } else { "s" },
            );
        }
    }
    Ok(())
}
