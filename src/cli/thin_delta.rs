//! thin_delta: print the differences between the mappings of two thin
//! devices (the peer's XML byte for byte, or JSON).

use std::ffi::OsString;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ArgGroup, Command};

use super::*;
use crate::thin::delta::{
    delta, DeltaError, DeltaOptions, JsonDeltaWriter, Target, XmlDeltaWriter,
};

fn command(name: &'static str) -> Command {
    let value = |id: &'static str, name: &'static str, help: &'static str| {
        Arg::new(id).long(id).value_name(name).help(help)
    };
    Command::new(name)
        .about("Print the differences in the mappings between two thin devices")
        .disable_version_flag(true)
        .arg(
            Arg::new("INPUT")
                .help("Specify the input device")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf)),
        )
        .arg(
            Arg::new("changes-only")
                .long("changes-only")
                .action(ArgAction::SetTrue)
                .help("Leave out the blocks that are the same on both sides (shared subtrees are not read)"),
        )
        .arg(
            Arg::new("format")
                .short('f')
                .long("format")
                .value_name("TYPE")
                .help("Choose the output format: xml (default), json"),
        )
        .arg(
            Arg::new("metadata-snap")
                .short('m')
                .long("metadata-snap")
                .value_name("BLOCKNR")
                .num_args(0..=1)
                .require_equals(true)
                .default_missing_value("")
                .help("Use metadata snapshot"),
        )
        .arg(quiet_arg())
        .arg(value(
            "root1",
            "BLOCKNR",
            "The root block for the first thin volume to diff",
        ))
        .arg(value(
            "root2",
            "BLOCKNR",
            "The root block for the second thin volume to diff",
        ))
        .arg(
            value(
                "thin1",
                "DEV_ID",
                "The numeric identifier for the first thin volume to diff",
            )
            .visible_alias("snap1"),
        )
        .arg(
            value(
                "thin2",
                "DEV_ID",
                "The numeric identifier for the second thin volume to diff",
            )
            .visible_alias("snap2"),
        )
        .arg(
            Arg::new("verbose")
                .long("verbose")
                .action(ArgAction::SetTrue)
                .help("Provide extra information on the mappings"),
        )
        .arg(version_arg())
        // One of each pair is required; `run` says which is missing in the
        // peer's words ("--thin1 or --root1 not specified").
        .group(ArgGroup::new("SNAP1").args(["thin1", "root1"]))
        .group(ArgGroup::new("SNAP2").args(["thin2", "root2"]))
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), |m| run(name, m))
}

fn target(m: &clap::ArgMatches, thin: &str, root: &str) -> Result<Target, Failure> {
    let num = |opt: &str, s: &String| {
        parse_u64(s).map_err(|e| Failure::new(EXIT_USAGE, format!("--{opt}: {e}")))
    };
    match (m.get_one::<String>(thin), m.get_one::<String>(root)) {
        (Some(s), _) => Ok(Target::Device(num(thin, s)?)),
        (None, Some(s)) => Ok(Target::Root(num(root, s)?)),
        (None, None) => Err(Failure::new(
            EXIT_USAGE,
            format!("--{thin} or --{root} not specified: give one of them"),
        )),
    }
}

fn run(name: &str, m: &clap::ArgMatches) -> Result<(), Failure> {
    let input = m.get_one::<PathBuf>("INPUT").unwrap();
    let quiet = m.get_flag("quiet");
    let verbose = m.get_flag("verbose");
    let changes_only = m.get_flag("changes-only");
    let json = match m.get_one::<String>("format").map(String::as_str) {
        None | Some("xml") => false,
        Some("json") => true,
        Some(other) => {
            return Err(Failure::new(
                EXIT_USAGE,
                format!("unknown format '{other}' (use xml or json)"),
            ))
        }
    };
    let metadata_snap = parse_metadata_snap(m)?;
    let left = target(m, "thin1", "root1")?;
    let right = target(m, "thin2", "root2")?;

    // Live metadata is opened exclusively, so a pool in use is refused;
    // a metadata snapshot is meant to be read while the pool runs.
    let mode = if metadata_snap.is_some() {
        OpenMode::ReadOnly
    } else {
        OpenMode::ReadOnlyExclusive
    };
    let dev = open_device(input, mode)?;
    let opts = DeltaOptions {
        metadata_snap,
        left,
        right,
        changes_only,
    };
    // Output is buffered (1 MiB) and dropped on failure, so a failing
    // delta prints nothing unless more than the buffer was written already.
    let w = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let (r, w) = if json {
        let mut v = JsonDeltaWriter::new(w, verbose, changes_only);
        (delta(&dev, &opts, &mut v), v.into_inner())
    } else {
        let mut v = XmlDeltaWriter::new(w, verbose, changes_only);
        (delta(&dev, &opts, &mut v), v.into_inner())
    };
    if r.is_err() {
        let _ = w.into_parts();
    }
    r.map_err(|e| delta_failure(input, e))?;
    if left == right && !quiet {
        // Not an error (the peer prints the same all-<same> diff), but
        // likely a slip: say so, after the output.
        let what = match left {
            Target::Device(id) => format!("device {id}"),
            Target::Root(b) => format!("the tree at block {b}"),
        };
        eprintln!("{name}: note: both sides are {what}, so every mapping is the same");
    }
    Ok(())
}

fn delta_failure(input: &Path, e: DeltaError) -> Failure {
    match e {
        DeltaError::Thin(e) => thin_failure(input, &e),
        e @ DeltaError::MissingDevices { .. } => {
            Failure::new(EXIT_NO_INPUT, format!("{}: {e}", input.display()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_side_each_is_required() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let c = || command("thin_delta");
        // A missing side is refused by `run`, in the peer's words.
        let m = c()
            .try_get_matches_from(args(&["thin_delta", "--thin1", "1", "x"]))
            .unwrap();
        let e = target(&m, "thin2", "root2").unwrap_err();
        assert_eq!(e.code, EXIT_USAGE);
        assert!(e.message.contains("--thin2 or --root2 not specified"));
        assert!(c()
            .try_get_matches_from(args(&[
                "thin_delta",
                "--thin1",
                "1",
                "--root1",
                "5",
                "--thin2",
                "2",
                "x"
            ]))
            .is_err());
        let m = c()
            .try_get_matches_from(args(&["thin_delta", "--snap1", "1", "--root2", "9", "x"]))
            .unwrap();
        assert_eq!(target(&m, "thin1", "root1").unwrap(), Target::Device(1));
        assert_eq!(target(&m, "thin2", "root2").unwrap(), Target::Root(9));
    }
}
