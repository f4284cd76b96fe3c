//! thin_shrink: make an inactive pool fit in fewer data blocks, moving the
//! data of the blocks at or above the new size down (XML to XML, or with
//! `--binary` metadata to metadata).
//!
//! Order (crash-safe): plan and validate everything (nothing written if the
//! blocks in use do not fit); copy the moved blocks' data into blocks the old
//! metadata does not use and flush it; only then write the new metadata
//! (binary: superblock last). The input is only read, so at every moment the
//! old metadata with the old data is a valid pool.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, Read};
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};

use super::progress::Progress;
use super::thin_restore::open_xml_file;
use super::*;
use crate::pdata::io::open_raw;
use crate::thin::dump::{dump, select_superblock, DumpOptions, MetadataVisitor, XmlWriter};
use crate::thin::restore::{build_pool, BuildError, Overrides, Pass};
use crate::thin::shrink::{copy_data, plan, Plan, Remap, ShrinkError, UsedBlocks};
use crate::thin::xml_read::{read_xml, XmlError};

fn command(name: &'static str) -> Command {
    let cmd = Command::new(name)
        .about("Rewrite xml metadata and move data in an inactive pool.")
        .disable_version_flag(true)
        .arg(
            Arg::new("binary")
                .long("binary")
                .action(ArgAction::SetTrue)
                .help("Perform binary metadata rebuild rather than XML rewrite"),
        )
        .arg(
            Arg::new("data")
                .long("data")
                .value_name("FILE")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("Specify pool data device where data will be moved"),
        );
    input_output_args(
        cmd,
        "Specify thinp metadata xml file (with --binary: the metadata device)",
    )
    .arg(
        Arg::new("no-copy")
            .long("no-copy")
            .action(ArgAction::SetTrue)
            .help("Skip the copying of data, useful for benchmarking"),
    )
    .arg(
        Arg::new("nr-blocks")
            .long("nr-blocks")
            .value_name("NUM")
            .required(true)
            .help("Specify new size for the pool (in data blocks)"),
    )
    .arg(quiet_arg())
    .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

struct Args<'a> {
    input: &'a Path,
    output: &'a Path,
    data: &'a Path,
    nr_blocks: u64,
    no_copy: bool,
    quiet: bool,
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let a = Args {
        input: m.get_one::<PathBuf>("input").unwrap(),
        output: m.get_one::<PathBuf>("output").unwrap(),
        data: m.get_one::<PathBuf>("data").unwrap(),
        nr_blocks: parse_u64(m.get_one::<String>("nr-blocks").unwrap())
            .map_err(|e| Failure::new(EXIT_USAGE, format!("--nr-blocks: {e}")))?,
        no_copy: m.get_flag("no-copy"),
        quiet: m.get_flag("quiet"),
    };
    let same = |x: &Path, y: &Path, what: &str| {
        if crate::pdata::io::same_file(x, y) {
            Err(Failure::new(EXIT_USAGE, format!("{}: {what}", y.display())))
        } else {
            Ok(())
        }
    };
    same(
        a.input,
        a.output,
        "the output is the input itself; thin_shrink writes the new metadata to another file or device",
    )?;
    same(a.input, a.data, "the data device is the metadata input")?;
    same(a.output, a.data, "the data device is the metadata output")?;
    if m.get_flag("binary") {
        run_binary(&a)
    } else {
        run_xml(&a)
    }
}

fn shrink_failure(a: &Args, e: ShrinkError) -> Failure {
    match e {
        e @ (ShrinkError::Insufficient { .. } | ShrinkError::Grow { .. }) => Failure::new(
            EXIT_USAGE,
            format!("{}: {e} (nothing was written)", a.input.display()),
        ),
        e @ ShrinkError::DataUnusable(_) => {
            Failure::new(EXIT_NO_INPUT, format!("{e} (nothing was written)"))
        }
        e @ ShrinkError::Data(_) => Failure::new(
            EXIT_IO,
            format!("{e} (the metadata was not changed: the pool is as it was)"),
        ),
    }
}

/// The plan for the pool `used` describes, with its messages.
fn make_plan(a: &Args, used: UsedBlocks) -> Result<Plan, Failure> {
    let old = used.superblock.as_ref().map_or(0, |sb| sb.nr_data_blocks);
    plan(&used.used.normalize(), old, a.nr_blocks).map_err(|e| shrink_failure(a, e))
}

/// The data device, opened for the copy (None with --no-copy: it is not touched).
fn open_data(a: &Args, plan: &Plan, block_bytes: u64) -> Result<Option<File>, Failure> {
    if a.no_copy {
        return Ok(None);
    }
    let raw =
        open_raw(a.data, OpenMode::ReadWriteExclusive).map_err(|e| open_failure(a.data, e))?;
    crate::thin::shrink::check_data_size(
        &a.data.display().to_string(),
        raw.size,
        block_bytes,
        plan,
    )
    .map_err(|e| shrink_failure(a, e))?;
    Ok(Some(raw.file))
}

/// Copy the moved blocks' data and flush it (nothing with --no-copy).
fn copy(a: &Args, data: Option<&File>, plan: &Plan, block_bytes: u64) -> Result<(), Failure> {
    let Some(data) = data else { return Ok(()) };
    let mut progress = Progress::new("Copying data", a.quiet, true);
    let r = copy_data(
        data,
        &a.data.display().to_string(),
        block_bytes,
        plan,
        &mut |d, t| progress.update(d, t),
    );
    progress.finish();
    r.map_err(|e| shrink_failure(a, e))
}

fn block_bytes(data_block_size: u32) -> u64 {
    data_block_size as u64 * 512
}

/// A hint for an input in the other format than the one expected.
fn looks_like_xml(path: &Path) -> bool {
    let mut head = [0u8; 512];
    let n = File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    head[..n]
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|&b| b == b'<')
}

fn xml_failure(a: &Args, e: XmlError) -> Failure {
    match e {
        XmlError::Read(e) => Failure::new(EXIT_IO, format!("{}: {e}", a.input.display())),
        e => {
            let hint = if looks_like_xml(a.input) {
                ""
            } else {
                " (this is not XML; for binary metadata add --binary)"
            };
            Failure::new(
                EXIT_DAMAGED,
                format!("{}: {e}{hint} (nothing was written)", a.input.display()),
            )
        }
    }
}

/// A file that could not be opened: missing or forbidden (66), or an I/O error (74).
fn io_failure(path: &Path, e: std::io::Error) -> Failure {
    use std::io::ErrorKind as K;
    let code = match e.kind() {
        K::NotFound | K::PermissionDenied | K::IsADirectory => EXIT_NO_INPUT,
        _ => EXIT_IO,
    };
    Failure::new(code, format!("{}: {e}", path.display()))
}

fn run_xml(a: &Args) -> Result<(), Failure> {
    let md = std::fs::metadata(a.input).map_err(|e| io_failure(a.input, e))?;
    if !md.is_file() {
        return Err(Failure::new(
            EXIT_NO_INPUT,
            format!(
                "{}: not a regular file (the XML is read twice: once to plan, once to write)",
                a.input.display()
            ),
        ));
    }
    let open = |title| open_xml_file(a.input, title, a.quiet).map_err(|e| io_failure(a.input, e));

    let mut used = UsedBlocks::default();
    read_xml(open("Reading XML")?, &mut used).map_err(|e| xml_failure(a, e))?;
    let Some(sb) = used.superblock.clone() else {
        return Err(Failure::new(
            EXIT_DAMAGED,
            format!("{}: no superblock in the XML", a.input.display()),
        ));
    };
    let plan = make_plan(a, used)?;
    let bb = block_bytes(sb.data_block_size);
    let data = open_data(a, &plan, bb)?;
    let out = File::create(a.output).map_err(|e| io_failure(a.output, e))?;

    copy(a, data.as_ref(), &plan, bb)?;

    let mut w = XmlWriter::new(BufWriter::with_capacity(1 << 20, out));
    let written: Result<(), String> = {
        let mut remap = Remap::new(&plan, &mut w);
        match read_xml(open("Writing XML")?, &mut remap) {
            Ok(_) => remap.finish().map_err(|e| e.to_string()),
            Err(e) => Err(format!("reading {} again: {e}", a.input.display())),
        }
    };
    written
        .and_then(|_| {
            w.into_inner()
                .into_inner()
                .map_err(|e| e.into_error())
                .and_then(|f| f.sync_all())
                .map_err(|e| e.to_string())
        })
        .map_err(|e| {
            Failure::new(
                EXIT_IO,
                format!(
                    "{}: writing the new XML: {e} (the input and the old data blocks are intact: the data copied went only to blocks the input does not use)",
                    a.output.display()
                ),
            )
        })
}

fn run_binary(a: &Args) -> Result<(), Failure> {
    let xml_hint = |mut f: Failure| {
        if looks_like_xml(a.input) {
            f.message
                .push_str(" (this looks like XML: drop --binary to shrink an XML dump)");
        }
        f
    };
    let src = open_device(a.input, OpenMode::ReadOnlyExclusive).map_err(xml_hint)?;
    let sb = select_superblock(&src, None).map_err(|e| xml_hint(thin_failure(a.input, &e)))?;
    if sb.metadata_snap != 0 {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "{}: a metadata snapshot is held (block {}): its mappings would still use the blocks being moved; release it first (thin_message ... release_metadata_snap)",
                a.input.display(),
                sb.metadata_snap
            ),
        ));
    }
    if sb.needs_check() {
        return Err(Failure::new(
            EXIT_DAMAGED,
            format!(
                "{}: the superblock's needs_check flag is set; run thin_check first",
                a.input.display()
            ),
        ));
    }
    crate::thin::check::require_sound(&src)
        .map_err(|e| Failure::new(EXIT_DAMAGED, format!("{}: {e}", a.input.display())))?;

    let opts = DumpOptions::default();
    let mut used = UsedBlocks::default();
    {
        let mut progress = Progress::new("Reading metadata", a.quiet, true);
        dump(&src, &opts, &mut used, &mut |d, t| progress.update(d, t))
            .map_err(|e| thin_failure(a.input, &e))?;
    }
    let plan = make_plan(a, used)?;
    let bb = block_bytes(sb.data_block_size);
    let data = open_data(a, &plan, bb)?;
    let dst = open_device(a.output, OpenMode::ReadWriteExclusive)?;

    // The copy runs once the dry run has validated the output (its size
    // included), before the first block of new metadata is written.
    let mut copied: Result<(), Failure> = Ok(());
    let built = build_pool(&dst, Overrides::default(), false, |b, pass| {
        if pass == Pass::Write {
            copied = copy(a, data.as_ref(), &plan, bb);
            if copied.is_err() {
                return Err(BuildError::Input("copying data failed".into()));
            }
        }
        let mut remap = Remap::new(&plan, b);
        dump(&src, &opts, &mut remap, &mut |_, _| {}).map_err(|e| BuildError::Input(e.to_string()))
    });
    copied?;
    built
        .map(|_| ())
        .map_err(|e| build_failure(e, a.input, a.output))
}
