//! thin_migrate: copy a live, read-only thin device's provisioned blocks to
//! another device or a file, with the mappings from the pool's held
//! metadata snapshot.

use std::ffi::OsString;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use clap::{Arg, Command};

use super::progress::Progress;
use super::thin_merge::{merge_failure, open_file, Access};
use super::*;
use crate::thin::extract::{extract, ExtractOptions, Output, Source};
use crate::thin::migrate::{dev_node, parse_pool_table, parse_thin_table, rdev_of};
use crate::thin::superblock::{read_superblock, SUPERBLOCK_LOCATION};

fn command(name: &'static str) -> Command {
    let path = |id: &'static str, value: &'static str, help: &'static str| {
        Arg::new(id)
            .long(id)
            .value_name(value)
            .value_parser(clap::value_parser!(PathBuf))
            .help(help)
    };
    Command::new(name)
        .about("Migrate a thin volume from one pool to another.")
        .disable_version_flag(true)
        .arg(
            Arg::new("buffer-size-meg")
                .long("buffer-size-meg")
                .value_name("MB")
                .value_parser(clap::value_parser!(u64))
                .help("Specify the size of the copy buffers, in megabytes"),
        )
        .arg(path("dest-dev", "DEVICE", "Specify the output device"))
        .arg(path("dest-file", "FILE", "Specify the output file"))
        .arg(quiet_arg())
        .arg(path(
            "source-dev",
            "DEVICE",
            "Specify the input device or file",
        ))
        .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

/// Drop the clean cached pages of block device `path` (what an earlier
/// buffered read left), so reads see what the kernel wrote since.
fn drop_page_cache(path: &Path) {
    use std::os::unix::io::AsRawFd;
    if let Ok(f) = std::fs::File::open(path) {
        // SAFETY: fadvise on an open descriptor; no memory is passed.
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
}

fn unusable(path: &Path, what: impl std::fmt::Display) -> Failure {
    Failure::new(EXIT_NO_INPUT, format!("{}: {what}", path.display()))
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let quiet = m.get_flag("quiet");
    let Some(source) = m.get_one::<PathBuf>("source-dev") else {
        return Err(Failure::new(EXIT_USAGE, "You must specify a source"));
    };
    let (dest, dest_is_file) = match (
        m.get_one::<PathBuf>("dest-dev"),
        m.get_one::<PathBuf>("dest-file"),
    ) {
        (None, None) => return Err(Failure::new(EXIT_USAGE, "You must specify a dest")),
        (Some(_), Some(_)) => {
            return Err(Failure::new(
                EXIT_USAGE,
                "--dest-dev and --dest-file exclude each other: give one destination",
            ))
        }
        (Some(d), None) => (d, false),
        (None, Some(f)) => (f, true),
    };
    let io_bytes = match m.get_one::<u64>("buffer-size-meg") {
        None => None,
        Some(&mb) if (1..=1024).contains(&mb) => Some((mb << 20) as usize),
        Some(mb) => {
            return Err(Failure::new(
                EXIT_USAGE,
                format!("--buffer-size-meg: {mb} is not between 1 and 1024"),
            ))
        }
    };

    // The source: a live thin device; its table names the pool, the pool's
    // names the metadata device.
    let md = std::fs::metadata(source)
        .map_err(|e| open_failure(source, crate::pdata::io::OpenError::from(e)))?;
    if !md.file_type().is_block_device() {
        return Err(unusable(
            source,
            "Not a block device: thin_migrate copies an active thin device (for a pool's metadata and data images, use thin_extract)",
        ));
    }
    let src_rdev = rdev_of(source).unwrap_or(0);
    let dm_err =
        |e: crate::dm::DmError| Failure::new(EXIT_NO_INPUT, format!("{}: {e}", source.display()));
    let table = crate::dm::table_by_dev(src_rdev)
        .map_err(dm_err)?
        .ok_or_else(|| unusable(source, "not a device-mapper device, so not a thin device"))?;
    let thin = parse_thin_table(&table).map_err(|e| unusable(source, e))?;
    let pool_table = crate::dm::table_by_dev(thin.pool)
        .map_err(dm_err)?
        .ok_or_else(|| {
            unusable(
                source,
                format!(
                    "its pool, device {}:{}, is gone",
                    libc::major(thin.pool),
                    libc::minor(thin.pool)
                ),
            )
        })?;
    let pool = parse_pool_table(&pool_table).map_err(|e| unusable(source, e))?;
    let meta_path = dev_node(pool.metadata).ok_or_else(|| {
        unusable(
            source,
            format!(
                "no device node for the pool's metadata device {}:{}",
                libc::major(pool.metadata),
                libc::minor(pool.metadata)
            ),
        )
    })?;
    if !table.read_only && !quiet {
        eprintln!(
            "thin_migrate: warning: {} is writable: blocks written after the metadata snapshot was reserved may be missing or torn in the copy (make it read-only first: lvchange --permission r)",
            source.display()
        );
    }

    // The destination must be none of the devices read.
    let busy = [
        (src_rdev, "the source device"),
        (thin.pool, "the source's pool"),
        (pool.metadata, "the pool's metadata device"),
        (pool.data, "the pool's data device"),
    ];
    if let Some(d) = rdev_of(dest) {
        if let Some((_, what)) = busy.iter().find(|(r, _)| *r == d) {
            return Err(Failure::new(
                EXIT_USAGE,
                format!("{}: is {what}; nothing was written", dest.display()),
            ));
        }
    }
    if dest_is_file && rdev_of(dest).is_some() {
        return Err(Failure::new(
            EXIT_USAGE,
            format!(
                "{}: is a block device; use --dest-dev for a device",
                dest.display()
            ),
        ));
    }

    // The metadata of a live pool: read only, shared, from the held
    // metadata snapshot. The kernel writes it past the device node's page
    // cache: drop what an earlier reader left there, or a released or
    // re-reserved snapshot would be read as it was.
    drop_page_cache(&meta_path);
    let meta = open_device(&meta_path, OpenMode::ReadOnly)?;
    let sb = read_superblock(&meta, SUPERBLOCK_LOCATION)
        .map_err(|e| thin_failure(&meta_path, &crate::thin::Error::metadata("superblock", e)))?;
    if sb.metadata_snap == 0 {
        return Err(Failure::new(
            EXIT_NO_INPUT,
            format!(
                "{}: the pool {} holds no metadata snapshot, which thin_migrate needs to read the mappings (dmsetup message {} 0 reserve_metadata_snap; release it afterwards)",
                meta_path.display(),
                pool_table.name,
                pool_table.name
            ),
        ));
    }
    if sb.data_block_size as u64 != pool.data_block_sectors {
        return Err(Failure::new(
            EXIT_DAMAGED,
            format!(
                "{}: data block size {} sectors in the superblock, {} in the pool's table",
                meta_path.display(),
                sb.data_block_size,
                pool.data_block_sectors
            ),
        ));
    }

    let src = open_file(source, Access::Read, false)?;
    let size = thin.sectors * 512;
    let src_name = source.display().to_string();
    let data_src = Source {
        file: &src.file,
        name: &src_name,
        size: src.size,
    };
    let opts = ExtractOptions {
        metadata_snap: Some(None),
        dev_id: thin.dev_id,
        size: Some(size),
        mapped_at_virtual: true,
        io_bytes,
    };

    let created = (dest_is_file && !dest.exists()).then(|| dest.clone());
    let out_file = if dest_is_file {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dest)
            .map_err(|e| {
                Failure::new(
                    EXIT_IO,
                    format!("{}: cannot create the output: {e}", dest.display()),
                )
            })
            .and_then(|f| {
                // Another thinmeta tool writing or reading it holds its
                // flock: refuse, as for every other output.
                // SAFETY: flock on a descriptor we own.
                let r = unsafe {
                    libc::flock(
                        std::os::unix::io::AsRawFd::as_raw_fd(&f),
                        libc::LOCK_EX | libc::LOCK_NB,
                    )
                };
                if r == 0 {
                    Ok(f)
                } else {
                    Err(output_open_failure(
                        dest,
                        std::io::Error::last_os_error().into(),
                    ))
                }
            })?
    } else {
        let o = open_file(dest, Access::Write, true)?;
        if o.size < size {
            return Err(Failure::new(
                EXIT_USAGE,
                format!(
                    "{}: {} bytes, smaller than the source's {size}; nothing was written",
                    dest.display(),
                    o.size
                ),
            ));
        }
        o.file
    };
    let out = if dest_is_file {
        Output::File(&out_file)
    } else {
        Output::BlockDevice(&out_file)
    };
    // With an external origin, unmapped ranges read the origin's bytes
    // through the thin device: they are copied too.
    let origin_src = thin.origin.map(|_| Source {
        file: &src.file,
        name: &src_name,
        size: src.size.min(size),
    });

    let mut progress = Progress::new("thin_migrate", quiet, true);
    let r = extract(
        &meta,
        &opts,
        &data_src,
        origin_src.as_ref(),
        out,
        &mut |d, t| progress.update(d, t),
    );
    progress.finish();
    let stats = r.map_err(|e| {
        if let Some(p) = &created {
            let _ = std::fs::remove_file(p);
        }
        merge_failure(&meta_path, e)
    })?;
    if stats.beyond_blocks > 0 && !quiet {
        eprintln!(
            "thin_migrate: warning: device {} maps {} block{} past its size ({size} bytes); they were not copied",
            thin.dev_id,
            stats.beyond_blocks,
            if stats.beyond_blocks == 1 { "" } else { "s" },
        );
    }
    Ok(())
}
