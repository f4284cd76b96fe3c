//! thin_repair: rebuild damaged thin metadata onto another device.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::Command;

use super::progress::Progress;
use super::*;

fn command(name: &'static str) -> Command {
    let cmd = Command::new(name)
        .about("Repair thin-provisioning metadata, and write it to different device or file")
        .disable_version_flag(true);
    let cmd = input_output_args(cmd, "Specify the input device").arg(quiet_arg());
    override_args(cmd, "Provide the data block size for repairing").arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let input = m.get_one::<PathBuf>("input").unwrap();
    let output = m.get_one::<PathBuf>("output").unwrap();
    let quiet = m.get_flag("quiet");
    let overrides = parse_overrides(m)?;
    if crate::pdata::io::same_file(input, output) {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "{}: the output is the input itself; repair writes to another device",
                output.display()
            ),
        ));
    }
    let src = open_device(input, OpenMode::ReadOnlyExclusive)?;
    let dst = open_output(output, OpenMode::ReadWriteExclusive)?;
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
        Err(e) => Err(build_failure(e, input, output)),
    }
}
