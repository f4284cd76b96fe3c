//! thin_extract: write a thin device's content (read offline from the
//! pool's metadata and data device) to a file or standard output.

use std::ffi::OsString;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

use clap::{Arg, Command};

use super::progress::Progress;
use super::thin_merge::{merge_failure, open_file, same_file, Access};
use super::*;
use crate::thin::extract::{extract, ExtractOptions, Output, Source};

fn command(name: &'static str) -> Command {
    let path = |id: &'static str, value: &'static str, help: &'static str| {
        Arg::new(id)
            .long(id)
            .value_name(value)
            .value_parser(clap::value_parser!(PathBuf))
            .help(help)
    };
    Command::new(name)
        .about("Write a thin device's content to a file or standard output")
        .disable_version_flag(true)
        .arg(path("metadata", "META", "The pool's metadata device").required(true))
        .arg(path("data", "DATA", "The pool's data device").required(true))
        .arg(
            Arg::new("dev-id")
                .long("dev-id")
                .value_name("DEV_ID")
                .required(true)
                .help("The thin device to extract"),
        )
        .arg(path(
            "origin",
            "ORIGIN",
            "The device's external origin: unmapped blocks are read from it",
        ))
        .arg(
            Arg::new("size")
                .long("size")
                .value_name("BYTES")
                .help("The device's size (default: the end of its highest mapped block, or the origin's size if larger)"),
        )
        .arg(
            Arg::new("metadata-snap")
                .short('m')
                .long("metadata-snap")
                .value_name("BLOCKNR")
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("")
                .help("Read the mappings from the metadata snapshot"),
        )
        .arg(
            Arg::new("output")
                .short('o')
                .long("output")
                .value_name("FILE")
                .help("Write to FILE (created or replaced; '-': standard output, the default)"),
        )
        .arg(quiet_arg())
        .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let meta_path = m.get_one::<PathBuf>("metadata").unwrap();
    let data_path = m.get_one::<PathBuf>("data").unwrap();
    let origin_path = m.get_one::<PathBuf>("origin");
    let quiet = m.get_flag("quiet");
    let num = |opt: &str| -> Result<Option<u64>, Failure> {
        m.get_one::<String>(opt)
            .map(|s| parse_u64(s).map_err(|e| Failure::new(EXIT_USAGE, format!("--{opt}: {e}"))))
            .transpose()
    };
    let opts = ExtractOptions {
        metadata_snap: parse_metadata_snap(m)?,
        dev_id: num("dev-id")?.unwrap(),
        size: num("size")?,
        ..Default::default()
    };
    let output = m
        .get_one::<String>("output")
        .filter(|s| s.as_str() != "-")
        .map(PathBuf::from);
    if output.is_none() && std::io::stdout().is_terminal() {
        return Err(Failure::new(
            EXIT_USAGE,
            "standard output is a terminal: give -o FILE (or redirect it)",
        ));
    }
    if let Some(out) = &output {
        let mut inputs = vec![(meta_path, "metadata"), (data_path, "data")];
        if let Some(o) = origin_path {
            inputs.push((o, "origin"));
        }
        for (p, what) in inputs {
            if same_file(out, p) {
                return Err(Failure::new(
                    EXIT_USAGE,
                    format!(
                        "{}: the output is the {what} device; nothing was written",
                        out.display()
                    ),
                ));
            }
        }
    }

    // Live metadata is read with the pool inactive (exclusive opens, as
    // thin_dump); a metadata snapshot is meant to be read while it runs.
    let exclusive = opts.metadata_snap.is_none();
    let mode = if exclusive {
        OpenMode::ReadOnlyExclusive
    } else {
        OpenMode::ReadOnly
    };
    let meta = open_device(meta_path, mode)?;
    let data = open_file(data_path, Access::Read, exclusive)?;
    let origin = origin_path
        .map(|p| open_file(p, Access::Read, false))
        .transpose()?;
    let data_name = data_path.display().to_string();
    let origin_name = origin_path.map(|p| p.display().to_string());
    let data_src = Source {
        file: &data.file,
        name: &data_name,
        size: data.size,
    };
    let origin_src = origin.as_ref().map(|o| Source {
        file: &o.file,
        name: origin_name.as_deref().unwrap_or(""),
        size: o.size,
    });

    // A file this run creates is removed again if the extract fails.
    let created = output.as_ref().filter(|p| !p.exists()).cloned();
    let out_file = match &output {
        None => None,
        Some(p) => {
            let is_dev = std::fs::metadata(p)
                .map(|md| {
                    use std::os::unix::fs::FileTypeExt;
                    md.file_type().is_block_device()
                })
                .unwrap_or(false);
            let file = if is_dev {
                open_file(p, Access::Write, true)?.file
            } else {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(p)
                    .map_err(|e| {
                        Failure::new(
                            EXIT_IO,
                            format!("{}: cannot create the output: {e}", p.display()),
                        )
                    })?
            };
            Some((file, is_dev))
        }
    };
    let stdout = std::io::stdout();
    let mut lock;
    let mut buffered;
    let out = match &out_file {
        Some((f, true)) => {
            let size = {
                use std::io::{Seek, SeekFrom};
                let mut r = f;
                r.seek(SeekFrom::End(0)).unwrap_or(0)
            };
            if let Some(want) = opts.size {
                if want > size {
                    return Err(Failure::new(
                        EXIT_USAGE,
                        format!(
                            "{}: {size} bytes, smaller than --size {want}; nothing was written",
                            output.as_ref().unwrap().display()
                        ),
                    ));
                }
            }
            Output::BlockDevice(f)
        }
        Some((f, false)) => Output::File(f),
        None => {
            lock = stdout.lock();
            buffered = std::io::BufWriter::with_capacity(1 << 20, &mut lock);
            Output::Stream(&mut buffered as &mut dyn Write)
        }
    };
    let mut progress = Progress::new("thin_extract", quiet, true);
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
        merge_failure(meta_path, e)
    })?;
    if stats.beyond_blocks > 0 && !quiet {
        eprintln!(
            "thin_extract: {} mapped block{} of device {} lie{} at or past --size {} and {} left out",
            stats.beyond_blocks,
            if stats.beyond_blocks == 1 { "" } else { "s" },
            opts.dev_id,
            if stats.beyond_blocks == 1 { "s" } else { "" },
            stats.size,
            if stats.beyond_blocks == 1 { "is" } else { "are" },
        );
    }
    Ok(())
}
