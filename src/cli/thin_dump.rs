//! thin_dump: print thin metadata as XML (the peer's, byte for byte),
//! human-readable text, or JSON.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;

use clap::{Arg, ArgAction, Command};

use super::progress::Progress;
use super::*;
use crate::thin::dump::{
    dump, DumpOptions, Format, HumanWriter, JsonWriter, MetadataVisitor, XmlWriter,
};

fn command(name: &'static str) -> Command {
    Command::new(name)
        .about("Dump thin-provisioning metadata to stdout in XML format")
        .disable_version_flag(true)
        .arg(
            Arg::new("INPUT")
                .help("Specify the input device to dump")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf)),
        )
        .arg(
            Arg::new("data-block-size")
                .long("data-block-size")
                .value_name("SECTORS")
                .help("Provide the data block size for repairing"),
        )
        .arg(
            Arg::new("dev-id")
                .long("dev-id")
                .value_name("THIN_ID")
                .action(ArgAction::Append)
                .help("Dump the specified device"),
        )
        .arg(
            Arg::new("format")
                .short('f')
                .long("format")
                .value_name("TYPE")
                .help("Choose the output format: xml (default), human_readable, json"),
        )
        .arg(
            Arg::new("metadata-snap")
                .short('m')
                .long("metadata-snap")
                .value_name("BLOCKNR")
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("")
                .help("Access the metadata snapshot on a live pool"),
        )
        .arg(
            Arg::new("nr-data-blocks")
                .long("nr-data-blocks")
                .value_name("NUM")
                .help("Override the number of data blocks if needed"),
        )
        .arg(
            Arg::new("output")
                .short('o')
                .long("output")
                .value_name("FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Specify the output file rather than stdout"),
        )
        .arg(quiet_arg())
        .arg(
            Arg::new("repair")
                .short('r')
                .long("repair")
                .action(ArgAction::SetTrue)
                .help("Repair the metadata whilst dumping it"),
        )
        .arg(
            Arg::new("skip-mappings")
                .long("skip-mappings")
                .action(ArgAction::SetTrue)
                .help("Do not dump the mappings"),
        )
        .arg(
            Arg::new("transaction-id")
                .long("transaction-id")
                .value_name("NUM")
                .help("Override the transaction id if needed"),
        )
        .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let input = m.get_one::<PathBuf>("INPUT").unwrap();
    let quiet = m.get_flag("quiet");

    let repair = m.get_flag("repair");
    let overrides = parse_overrides(m)?;
    if repair
        && (m.get_one::<String>("metadata-snap").is_some()
            || m.get_many::<String>("dev-id").is_some()
            || m.get_flag("skip-mappings"))
    {
        return Err(Failure::new(
            EXIT_USAGE,
            "--repair dumps everything recoverable from the live metadata; it cannot be combined with -m, --dev-id or --skip-mappings",
        ));
    }

    let format = match m.get_one::<String>("format").map(String::as_str) {
        None | Some("xml") => Format::Xml,
        Some("human_readable") => Format::HumanReadable,
        Some("json") => Format::Json,
        Some(other) => {
            return Err(Failure::new(
                EXIT_USAGE,
                format!("unknown format '{other}' (use xml, human_readable or json)"),
            ))
        }
    };
    let metadata_snap = parse_metadata_snap(m)?;
    let mut dev_ids = Vec::new();
    for s in m.get_many::<String>("dev-id").into_iter().flatten() {
        dev_ids.push(parse_u64(s).map_err(|e| Failure::new(EXIT_USAGE, format!("--dev-id: {e}")))?);
    }
    let opts = DumpOptions {
        metadata_snap,
        dev_ids,
        skip_mappings: m.get_flag("skip-mappings"),
        overrides,
    };

    // Live metadata is opened exclusively, so a pool in use is refused;
    // a metadata snapshot is meant to be read while the pool runs.
    let mode = if metadata_snap.is_some() {
        OpenMode::ReadOnly
    } else {
        OpenMode::ReadOnlyExclusive
    };
    let dev = open_device(input, mode)?;

    let output = m.get_one::<PathBuf>("output");
    if let Some(o) = output {
        if same_file(input, o) {
            return Err(Failure::new(
                EXIT_USAGE,
                format!(
                    "{}: the output is the input metadata itself; refusing to overwrite it",
                    o.display()
                ),
            ));
        }
    }
    let to_terminal = output.is_none() && std::io::stdout().is_terminal();
    let sink: Box<dyn Write> = match output {
        Some(p) => Box::new(File::create(p).map_err(|e| {
            Failure::new(
                EXIT_IO,
                format!("{}: cannot create output: {e}", p.display()),
            )
        })?),
        None => Box::new(std::io::stdout().lock()),
    };
    let w = BufWriter::with_capacity(1 << 20, sink);
    let mut writer: Box<dyn MetadataVisitor> = match format {
        Format::Xml => Box::new(XmlWriter::new(w)),
        Format::HumanReadable => Box::new(HumanWriter::new(w)),
        Format::Json => Box::new(JsonWriter::new(w)),
    };
    let mut progress = Progress::new("Dumping", quiet, !to_terminal);
    let r = if repair {
        crate::thin::repair::find_source(&dev, overrides, &mut |d, t| progress.update(d, t))
            .and_then(|src| {
                if !quiet {
                    for n in &src.notes {
                        eprintln!("thin_dump: {}: {n}", input.display());
                    }
                }
                crate::thin::repair::emit(&dev, &src, writer.as_mut(), &mut |d, t| {
                    progress.update(d, t)
                })
            })
    } else {
        dump(&dev, &opts, writer.as_mut(), &mut |d, t| {
            progress.update(d, t)
        })
    };
    progress.finish();
    r.map_err(|e| thin_failure(input, &e))
}

use crate::pdata::io::same_file;
