//! thin_merge: merge a thin device into its external origin (a data copy),
//! or a thin snapshot into its thin origin (metadata only).

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ArgGroup, Command};

use super::progress::Progress;
use super::*;
use crate::thin::merge::{
    merge_external, merge_into_thin, plan_external, pool_info, CopyStats, CopyTarget, DeltaCounts,
    ExternalMerge, MergeError,
};

fn command(name: &'static str) -> Command {
    let path = |id: &'static str, value: &'static str, help: &'static str| {
        Arg::new(id)
            .long(id)
            .value_name(value)
            .value_parser(clap::value_parser!(PathBuf))
            .help(help)
    };
    let id = |id: &'static str, help: &'static str| {
        Arg::new(id).long(id).value_name("DEV_ID").help(help)
    };
    Command::new(name)
        .about("Merge a thin device into its external origin (copying its mapped blocks), or a thin snapshot into its thin origin (metadata only)")
        .disable_version_flag(true)
        .arg(path("metadata", "META", "The pool's metadata device").required(true))
        .arg(id("dev-id", "The thin device to merge").required(true))
        .arg(path("origin", "ORIGIN", "The external origin to merge into (written)"))
        .arg(path("data", "DATA", "The pool's data device (with --origin)"))
        .arg(id(
            "delta-from",
            "With --origin: copy only what differs from this device, whose content the origin already holds",
        ))
        .arg(
            Arg::new("metadata-snap")
                .short('m')
                .long("metadata-snap")
                .value_name("BLOCKNR")
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("")
                .help("With --origin: read the mappings from the metadata snapshot"),
        )
        .arg(id(
            "into-thin",
            "Merge the snapshot --dev-id into this thin device (metadata only)",
        ))
        .arg(
            Arg::new("dry-run")
                .long("dry-run")
                .action(ArgAction::SetTrue)
                .help("Say what would be done; write nothing"),
        )
        .arg(
            Arg::new("fail-after-writes")
                .long("fail-after-writes")
                .value_name("K")
                .hide(true)
                .help("Test hook: stop before the origin's write K+1, as if interrupted"),
        )
        .arg(quiet_arg())
        .arg(version_arg())
        .group(
            ArgGroup::new("target")
                .args(["origin", "into-thin"])
                .required(true),
        )
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), |m| run(name, m))
}

fn num(m: &clap::ArgMatches, opt: &str) -> Result<Option<u64>, Failure> {
    m.get_one::<String>(opt)
        .map(|s| parse_u64(s).map_err(|e| Failure::new(EXIT_USAGE, format!("--{opt}: {e}"))))
        .transpose()
}

fn dev_id(m: &clap::ArgMatches, opt: &str) -> Result<Option<u64>, Failure> {
    let id = num(m, opt)?;
    if let Some(id) = id {
        if id > crate::thin::message::MAX_DEV_ID {
            return Err(Failure::new(
                EXIT_USAGE,
                format!(
                    "--{opt}: device id {id} is above the limit of {} (24 bits)",
                    crate::thin::message::MAX_DEV_ID
                ),
            ));
        }
    }
    Ok(id)
}

fn run(name: &str, m: &clap::ArgMatches) -> Result<(), Failure> {
    let meta_path = m.get_one::<PathBuf>("metadata").unwrap();
    let quiet = m.get_flag("quiet");
    let dry_run = m.get_flag("dry-run");
    let id = dev_id(m, "dev-id")?.unwrap();
    if let Some(origin_id) = dev_id(m, "into-thin")? {
        for opt in ["data", "delta-from", "metadata-snap", "fail-after-writes"] {
            if m.contains_id(opt) {
                return Err(Failure::new(
                    EXIT_USAGE,
                    format!("--{opt} does not go with --into-thin (a metadata-only merge of the live metadata)"),
                ));
            }
        }
        return into_thin(meta_path, id, origin_id, dry_run, quiet);
    }
    let origin_path = m.get_one::<PathBuf>("origin").unwrap();
    let Some(data_path) = m.get_one::<PathBuf>("data") else {
        return Err(Failure::new(
            EXIT_USAGE,
            "--origin needs --data (the pool's data device)",
        ));
    };
    let opts = ExternalMerge {
        metadata_snap: parse_metadata_snap(m)?,
        dev_id: id,
        delta_from: dev_id(m, "delta-from")?,
        fail_after_writes: num(m, "fail-after-writes")?,
    };

    for (p, what) in [(meta_path, "metadata"), (data_path, "data")] {
        if same_file(origin_path, p) {
            return Err(Failure::new(
                EXIT_USAGE,
                format!(
                    "{}: the origin is the pool's {what} device; nothing was written",
                    origin_path.display()
                ),
            ));
        }
    }
    // A pool in use holds its metadata and data devices open exclusively:
    // opening them so fails (busy), also to read a metadata snapshot.
    let meta = open_device(meta_path, OpenMode::ReadOnlyExclusive)?;
    let data = open_file(data_path, Access::Read, true)?;
    let origin = open_file(
        origin_path,
        if dry_run { Access::Read } else { Access::Write },
        true,
    )?;
    let fail = |e: MergeError| merge_failure(meta_path, e);
    let pool = pool_info(&meta, &opts).map_err(fail)?;
    let need = pool.nr_data_blocks.saturating_mul(pool.block_bytes);
    if data.size < need {
        return Err(Failure::new(
            EXIT_NO_INPUT,
            format!(
                "{}: {} bytes, smaller than the pool's {} data blocks of {} bytes ({need} bytes): not the pool's data device?",
                data_path.display(),
                data.size,
                pool.nr_data_blocks,
                pool.block_bytes
            ),
        ));
    }
    let (plan, delta) = plan_external(&meta, &opts, &pool, origin.size).map_err(fail)?;
    let origin_name = origin_path.display().to_string();
    let data_name = data_path.display().to_string();
    let stats = if dry_run {
        plan
    } else {
        let mut progress = Progress::new("thin_merge", quiet, true);
        let target = CopyTarget {
            data: &data.file,
            data_name: &data_name,
            origin: &origin.file,
            origin_name: &origin_name,
            origin_size: origin.size,
        };
        let (stats, _) = merge_external(&meta, &opts, &pool, &target, plan.bytes, &mut |d, t| {
            progress.update(d, t)
        })
        .map_err(|e| {
            let mut f = merge_failure(meta_path, e);
            f.message.push_str(
                "; the origin may be partly merged: run the same command again to finish (the copy is idempotent)",
            );
            f
        })?;
        progress.finish();
        stats
    };
    if !quiet {
        println!(
            "{}",
            summary(id, &origin_name, &stats, delta.as_ref(), &opts, dry_run)
        );
    }
    if let (Some(d), Some(old)) = (&delta, opts.delta_from) {
        if let Some(first) = d.first_left_only {
            // Said even with -q: the device reads these from the origin.
            let n = d.left_only_blocks;
            let (is, it) = if n == 1 {
                ("is", "it")
            } else {
                ("are", "them")
            };
            eprintln!(
                "{name}: note: {n} block{} mapped by device {old} but not by device {id} (the first at virtual block {first}) {is} left as the origin holds {it} (device {old}'s data, if it was merged): device {id} reads the origin there",
                plural(n)
            );
        }
    }
    if stats.beyond_blocks > 0 {
        // Said even with -q: these blocks are not in the origin.
        let first = stats.first_beyond.unwrap_or(0);
        let need = stats.end_block.saturating_mul(pool.block_bytes);
        eprintln!(
            "{name}: {} mapped block{} of device {id} (the first at virtual block {first}) lie{} past the end of {origin_name} ({} bytes) and {}: the origin must grow to {need} bytes to hold {}",
            stats.beyond_blocks,
            plural(stats.beyond_blocks),
            if stats.beyond_blocks == 1 { "s" } else { "" },
            origin.size,
            match (dry_run, stats.beyond_blocks == 1) {
                (true, _) => "would not be copied",
                (false, true) => "was not copied",
                (false, false) => "were not copied",
            },
            if stats.beyond_blocks == 1 { "it" } else { "them" },
        );
    }
    Ok(())
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

fn summary(
    id: u64,
    origin: &str,
    s: &CopyStats,
    delta: Option<&DeltaCounts>,
    opts: &ExternalMerge,
    dry_run: bool,
) -> String {
    let verb = if dry_run { "would copy" } else { "copied" };
    let mut line = format!(
        "device {id} -> {origin}: {verb} {} run{}, {} block{}, {} bytes ({})",
        s.runs,
        plural(s.runs),
        s.blocks,
        plural(s.blocks),
        s.bytes,
        human(s.bytes)
    );
    if !dry_run {
        line.push_str(&format!(" in {} write{}", s.writes, plural(s.writes)));
    }
    if let (Some(d), Some(old)) = (delta, opts.delta_from) {
        line.push_str(&format!(
            "; delta from device {old}: {} subtree{} shared (not read), {} block{} the same, {} block{} mapped only by device {old} (left as they are)",
            d.shared_subtrees,
            plural(d.shared_subtrees),
            d.same_blocks,
            plural(d.same_blocks),
            d.left_only_blocks,
            plural(d.left_only_blocks),
        ));
    }
    line
}

/// Bytes as a short human figure (KiB, MiB, GiB, TiB).
pub(super) fn human(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn into_thin(
    meta_path: &Path,
    snap: u64,
    origin: u64,
    dry_run: bool,
    quiet: bool,
) -> Result<(), Failure> {
    let mode = if dry_run {
        OpenMode::ReadOnlyExclusive
    } else {
        OpenMode::ReadWriteExclusive
    };
    let meta = open_device(meta_path, mode)?;
    let r = merge_into_thin(&meta, snap, origin, dry_run).map_err(|e| {
        let mut f = merge_failure(meta_path, e);
        f.message.push_str("; nothing was written");
        f
    })?;
    if !quiet {
        let verb = if dry_run { "would merge" } else { "merged" };
        println!(
            "{verb} snapshot {snap} into device {origin}: device {origin} maps {} block{} (was {}), device {snap} removed; {} data block{} and {} metadata block{} freed",
            r.origin_after.mapped_blocks,
            plural(r.origin_after.mapped_blocks),
            r.origin_before.mapped_blocks,
            r.data_blocks_freed,
            plural(r.data_blocks_freed),
            r.metadata_blocks_freed,
            plural(r.metadata_blocks_freed),
        );
    }
    Ok(())
}

/// Message and exit code of a failed merge or extract on metadata `meta`.
pub(super) fn merge_failure(meta: &Path, e: MergeError) -> Failure {
    match e {
        MergeError::Refused(s) => Failure::new(EXIT_USAGE, format!("{}: {s}", meta.display())),
        e @ (MergeError::NeedsCheck | MergeError::Unsound(_)) => {
            Failure::new(EXIT_DAMAGED, format!("{}: {e}", meta.display()))
        }
        MergeError::Thin(e) => thin_failure(meta, &e),
        MergeError::Metadata(e) => Failure::new(
            if e.is_io() { EXIT_IO } else { EXIT_DAMAGED },
            format!("{}: {e}", meta.display()),
        ),
        e @ (MergeError::Io { .. } | MergeError::Interrupted(_)) => {
            Failure::new(EXIT_IO, e.to_string())
        }
    }
}

//------------------------------------------------------------------------------
// Data devices and files

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Read,
    Write,
}

/// An open data device, origin or output, and its size.
pub(super) struct Opened {
    pub file: File,
    pub size: u64,
}

/// Open `path`. `exclusive`: `O_EXCL` on a block device (fails, busy, while
/// a live pool or anything else holds it), and for writing a regular file,
/// an exclusive `flock` (held until the file is closed).
pub(super) fn open_file(path: &Path, access: Access, exclusive: bool) -> Result<Opened, Failure> {
    use std::io::{Seek, SeekFrom};
    // Data devices and origins are large: a pipe is refused, not copied.
    let md = std::fs::metadata(path).map_err(|e| open_failure(path, e))?;
    if !(md.is_file() || md.is_dir() || md.file_type().is_block_device()) {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "{}: is a pipe or other stream; a file or block device is needed",
                path.display()
            ),
        ));
    }
    let mode = match (access, exclusive) {
        (Access::Read, false) => OpenMode::ReadOnly,
        (Access::Read, true) => OpenMode::ReadOnlyExclusive,
        (Access::Write, _) => OpenMode::ReadWriteExclusive,
    };
    let mut raw = crate::pdata::io::open_raw(path, mode).map_err(|e| match access {
        Access::Read => super::open_failure(path, e),
        Access::Write => super::output_open_failure(path, e),
    })?;
    raw.file
        .seek(SeekFrom::Start(0))
        .map_err(|e| open_failure(path, e))?;
    Ok(Opened {
        file: raw.file,
        size: raw.size,
    })
}

fn open_failure(path: &Path, e: std::io::Error) -> Failure {
    let (code, what) = match e.raw_os_error() {
        Some(libc::ENOENT) => (EXIT_NO_INPUT, "no such file or device".to_string()),
        Some(libc::EBUSY) => (
            EXIT_BUSY,
            "device is in use (held open by a live pool, or mounted)".to_string(),
        ),
        Some(libc::EACCES) | Some(libc::EPERM) => (EXIT_NO_INPUT, "Permission denied".to_string()),
        Some(libc::EROFS) => (EXIT_NO_INPUT, "read-only file system".to_string()),
        _ => (EXIT_IO, e.to_string()),
    };
    Failure::new(code, format!("{}: {what}", path.display()))
}

pub(super) use crate::pdata::io::same_file;
