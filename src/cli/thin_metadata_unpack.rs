//! thin_metadata_unpack: rebuild the metadata image a pack file holds.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::path::Path;

use clap::Command;

use super::progress::Progress;
use super::thin_metadata_pack::{create_failure, pack_args, pack_command, PackArgs};
use super::*;
use crate::pdata::io::open_raw;
use crate::pdata::pack::{validate, write_image, PackError, UnpackError};

fn command(name: &'static str) -> Command {
    pack_command(
        name,
        "Unpack a compressed file of thin metadata.",
        ("FILE", "Specify packed input file"),
        ("DEV", "Specify thinp metadata binary device/file"),
    )
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

fn pack_failure(input: &Path, e: PackError) -> Failure {
    let code = if e.is_io() { EXIT_IO } else { EXIT_DAMAGED };
    Failure::new(code, format!("{}: {e}", input.display()))
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let PackArgs {
        input,
        output,
        quiet,
    } = pack_args(m, "unpack to another file or device")?;
    // A pipe or a gzip-compressed pack is read into a temporary file.
    let pack = open_raw(input, OpenMode::ReadOnlyExclusive).map_err(|e| open_failure(input, e))?;

    // Read the whole pack once before touching the output: a truncated or
    // corrupt pack writes nothing.
    let mut progress = Progress::new("Checking pack", quiet, true);
    let v = validate(&pack.file, pack.size, &mut |d, t| progress.update(d, t))
        .map_err(|e| pack_failure(input, e))?;
    progress.finish();
    if !quiet && v.present.binary_search(&0).is_err() {
        // A pack cut exactly at a chunk boundary still reads as whole.
        eprintln!(
            "thin_metadata_unpack: {}: note: the pack holds no block 0, so the image has no superblock (a pack of an empty device, or one cut short)",
            input.display()
        );
    }

    if !output.exists() {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(output)
            .map_err(|e| create_failure(output, e))?;
    }
    let out =
        open_raw(output, OpenMode::ReadWriteExclusive).map_err(|e| open_failure(output, e))?;
    let mut progress = Progress::new("Unpacking", quiet, true);
    let r = write_image(
        &pack.file,
        pack.size,
        &v,
        &out.file,
        out.size,
        out.is_block_device,
        &mut |d, t| progress.update(d, t),
    );
    progress.finish();
    r.map_err(|e| match e {
        UnpackError::Pack(e) => pack_failure(input, e),
        e @ UnpackError::OutputTooSmall { .. } => {
            Failure::new(EXIT_NO_INPUT, format!("{}: {e}", output.display()))
        }
        e @ UnpackError::Write { .. } => {
            Failure::new(EXIT_IO, format!("{}: {e}", output.display()))
        }
    })
}
