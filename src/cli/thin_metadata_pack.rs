//! thin_metadata_pack: compress metadata into a pack file (the original's
//! format, version 3), keeping only the blocks that are metadata.

use std::ffi::OsString;
use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};

use super::progress::Progress;
use super::*;
use crate::pdata::pack::{pack_device, PackWriteError};

fn command(name: &'static str) -> Command {
    pack_command(
        name,
        "Produces a compressed file of thin metadata.  Only packs metadata blocks that are actually used.",
        ("DEV", "Specify thinp metadata binary device/file"),
        ("FILE", "Specify packed output file"),
    )
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

/// The command line both pack tools take: `-i`, `-o` (each a required path
/// given as its value name and help), `-f`, `-q`, `-V`.
pub(super) fn pack_command(
    name: &'static str,
    about: &'static str,
    (in_value, in_help): (&'static str, &'static str),
    (out_value, out_help): (&'static str, &'static str),
) -> Command {
    let path = |id: &'static str, short: char, value: &'static str, help: &'static str| {
        Arg::new(id)
            .short(short)
            .long(id)
            .value_name(value)
            .required(true)
            .value_parser(clap::value_parser!(PathBuf))
            .help(help)
    };
    Command::new(name)
        .about(about)
        .disable_version_flag(true)
        .arg(
            Arg::new("force")
                .short('f')
                .long("force")
                .action(ArgAction::SetTrue)
                .help("Force overwrite the output file"),
        )
        .arg(path("input", 'i', in_value, in_help))
        .arg(path("output", 'o', out_value, out_help))
        .arg(quiet_arg())
        .arg(version_arg())
}

/// The arguments of [`pack_command`].
pub(super) struct PackArgs<'a> {
    pub input: &'a Path,
    pub output: &'a Path,
    pub quiet: bool,
}

/// The arguments of [`pack_command`], refusing an output that is the input
/// itself (`elsewhere`: where the output should go instead).
pub(super) fn pack_args<'a>(
    m: &'a clap::ArgMatches,
    elsewhere: &str,
) -> Result<PackArgs<'a>, Failure> {
    let input = m.get_one::<PathBuf>("input").unwrap();
    let output = m.get_one::<PathBuf>("output").unwrap();
    if crate::pdata::io::same_file(input, output) {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "{}: the output is the input itself; {elsewhere}",
                output.display()
            ),
        ));
    }
    Ok(PackArgs {
        input,
        output,
        quiet: m.get_flag("quiet"),
    })
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let PackArgs {
        input,
        output,
        quiet,
    } = pack_args(m, "the pack goes to another file")?;
    // Exclusive: a block device a live pool holds open is refused.
    let dev = open_device(input, OpenMode::ReadOnlyExclusive)?;
    let existed = output.exists();
    let file = File::create(output).map_err(|e| create_failure(output, e))?;
    let mut progress = Progress::new("Packing", quiet, true);
    let r = pack_device(
        &dev,
        BufWriter::with_capacity(1 << 20, &file),
        &mut |d, t| progress.update(d, t),
    )
    .map_err(|e| match e {
        PackWriteError::Read(e) => Failure::new(
            if e.is_io() { EXIT_IO } else { EXIT_INTERNAL },
            format!("{}: {e}", input.display()),
        ),
        PackWriteError::Write(e) => Failure::new(EXIT_IO, format!("{}: {e}", output.display())),
    })
    .and_then(|_| {
        file.sync_all()
            .map_err(|e| Failure::new(EXIT_IO, format!("{}: {e}", output.display())))
    });
    progress.finish();
    if r.is_err() && !existed && file.metadata().is_ok_and(|md| md.is_file()) {
        // Leave no half-written pack behind.
        let _ = std::fs::remove_file(output);
    }
    r
}

/// The failure to create an output file (its folder is missing, or
/// permission is denied).
pub(super) fn create_failure(path: &std::path::Path, e: std::io::Error) -> Failure {
    use std::io::ErrorKind as K;
    let code = match e.kind() {
        K::NotFound | K::PermissionDenied | K::IsADirectory => EXIT_NO_INPUT,
        _ => EXIT_IO,
    };
    Failure::new(
        code,
        format!("{}: cannot create the output file: {e}", path.display()),
    )
}
