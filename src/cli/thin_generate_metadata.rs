//! thin_generate_metadata: write a synthetic, realistically aged pool (origins,
//! snapshot epochs, copy-on-write, shared leaves) straight to a metadata
//! device, or as XML. For tests and benchmarks.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufWriter};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};

use super::progress::Progress;
use super::*;
use crate::thin::dump::{DeviceInfo, Mapping, MetadataVisitor, SuperblockInfo, XmlWriter};
use crate::thin::generate::{emit, GenParams, Model, ModelStats};
use crate::thin::restore::{build_pool, BuildError, Overrides, Pass};

fn num_arg(name: &'static str, value: &'static str, help: &'static str) -> Arg {
    Arg::new(name).long(name).value_name(value).help(help)
}

fn command(name: &'static str) -> Command {
    let d = GenParams::default();
    // The defaults, shown in --help (leaked once: clap wants 'static strings).
    let dflt = |h: &str, v: String| -> &'static str {
        Box::leak(format!("{h} [default: {v}]").into_boxed_str())
    };
    // The model's parameters: (option, value name, help, default).
    let params: [(&'static str, &'static str, &str, String); 10] = [
        ("origins", "N", "Origin volumes", d.origins.to_string()),
        (
            "segments",
            "N",
            "Segments of 252 blocks per origin",
            d.segments.to_string(),
        ),
        (
            "snaps",
            "N",
            "Snapshot epochs (one snapshot of every origin each)",
            d.snaps.to_string(),
        ),
        (
            "fill",
            "F",
            "Fraction of segments provisioned",
            d.fill.to_string(),
        ),
        (
            "partial",
            "F",
            "Fraction of provisioned segments only partly mapped",
            d.partial.to_string(),
        ),
        (
            "writes",
            "F",
            "Write runs per origin and epoch, as a fraction of --segments",
            d.writes.to_string(),
        ),
        (
            "hole-writes",
            "F",
            "Fraction of write runs that provision a hole segment",
            d.hole_writes.to_string(),
        ),
        ("seed", "N", "Random seed", d.seed.to_string()),
        (
            "data-block-size",
            "SECTORS",
            "Data block size in 512-byte sectors",
            d.data_block_size.to_string(),
        ),
        (
            "headroom",
            "F",
            "nr_data_blocks = data blocks used * F",
            d.headroom.to_string(),
        ),
    ];
    let mut cmd = Command::new(name)
        .about("Generate the metadata of a synthetic, aged thin pool (origins, snapshots, shared leaves)")
        .disable_version_flag(true)
        .arg(
            Arg::new("output")
                .short('o')
                .long("output")
                .value_name("FILE")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("Metadata device or file to write (must exist), or the XML file to create with --format xml"),
        )
        ;
    for (name, value, help, default) in params {
        cmd = cmd.arg(num_arg(name, value, dflt(help, default)));
    }
    cmd.arg(
        Arg::new("metadata-snap")
            .long("metadata-snap")
            .action(ArgAction::SetTrue)
            .help("Also reserve a metadata snapshot of the generated pool"),
    )
    .arg(
        Arg::new("format")
            .long("format")
            .value_name("TYPE")
            .help("binary (default): write the metadata; xml: write thin_dump XML"),
    )
    .arg(quiet_arg())
    .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), |m| run(name, m))
}

fn usage(msg: String) -> Failure {
    Failure::new(EXIT_USAGE, msg)
}

/// The generator's parameters from the command line.
fn params(m: &clap::ArgMatches) -> Result<GenParams, Failure> {
    fn get<T: std::str::FromStr>(
        m: &clap::ArgMatches,
        opt: &str,
        dst: &mut T,
    ) -> Result<(), Failure> {
        if let Some(s) = m.get_one::<String>(opt) {
            *dst = s
                .trim()
                .parse()
                .map_err(|_| usage(format!("--{opt}: '{s}' is not a valid number")))?;
        }
        Ok(())
    }
    let mut p = GenParams::default();
    get(m, "origins", &mut p.origins)?;
    get(m, "segments", &mut p.segments)?;
    get(m, "snaps", &mut p.snaps)?;
    get(m, "fill", &mut p.fill)?;
    get(m, "partial", &mut p.partial)?;
    get(m, "writes", &mut p.writes)?;
    get(m, "hole-writes", &mut p.hole_writes)?;
    get(m, "seed", &mut p.seed)?;
    get(m, "data-block-size", &mut p.data_block_size)?;
    get(m, "headroom", &mut p.headroom)?;
    p.metadata_snap = m.get_flag("metadata-snap");
    p.validate().map_err(usage)?;
    Ok(p)
}

/// Forwards events, counting mapped blocks for the progress bar.
struct Counted<'a> {
    inner: &'a mut dyn MetadataVisitor,
    progress: Progress,
    done: u64,
    shown: u64,
    total: u64,
}

impl MetadataVisitor for Counted<'_> {
    fn superblock_begin(&mut self, sb: &SuperblockInfo) -> io::Result<()> {
        self.inner.superblock_begin(sb)
    }
    fn superblock_end(&mut self) -> io::Result<()> {
        self.inner.superblock_end()
    }
    fn def_begin(&mut self, name: &str) -> io::Result<()> {
        self.inner.def_begin(name)
    }
    fn def_end(&mut self) -> io::Result<()> {
        self.inner.def_end()
    }
    fn device_begin(&mut self, d: &DeviceInfo) -> io::Result<()> {
        self.inner.device_begin(d)
    }
    fn device_end(&mut self) -> io::Result<()> {
        self.inner.device_end()
    }
    fn mapping(&mut self, m: &Mapping) -> io::Result<()> {
        self.done += m.len;
        if self.done - self.shown >= 1 << 20 {
            self.shown = self.done;
            self.progress.update(self.done, self.total);
        }
        self.inner.mapping(m)
    }
    fn reference(&mut self, name: &str) -> io::Result<()> {
        self.inner.reference(name)
    }
    fn finish(&mut self) -> io::Result<()> {
        self.progress.finish();
        self.inner.finish()
    }
}

fn counted<'a>(
    inner: &'a mut dyn MetadataVisitor,
    title: &'static str,
    quiet: bool,
    stats: &ModelStats,
) -> Counted<'a> {
    Counted {
        inner,
        progress: Progress::new(title, quiet, true),
        done: 0,
        shown: 0,
        total: stats.distinct_entries,
    }
}

fn summary(stats: &ModelStats, metadata_blocks: Option<u64>) -> String {
    let mut s = format!(
        "{} devices, {} mappings, {} distinct leaf entries ({} shared segment versions), {} of {} data blocks used",
        stats.devices,
        stats.total_mappings,
        stats.distinct_entries,
        stats.shared_versions,
        stats.data_blocks_used,
        stats.nr_data_blocks
    );
    if let Some(b) = metadata_blocks {
        s.push_str(&format!(
            ", {b} metadata blocks used ({:.1} MiB)",
            b as f64 / 256.0
        ));
    }
    s
}

fn run(name: &str, m: &clap::ArgMatches) -> Result<(), Failure> {
    let output = m.get_one::<PathBuf>("output").unwrap();
    let quiet = m.get_flag("quiet");
    let xml = match m.get_one::<String>("format").map(String::as_str) {
        None | Some("binary") => false,
        Some("xml") => true,
        Some(f) => {
            return Err(usage(format!(
                "--format: unknown format '{f}' (binary or xml)"
            )))
        }
    };
    let p = params(m)?;
    if xml && p.metadata_snap {
        return Err(usage(
            "--metadata-snap needs the binary format (XML cannot hold a metadata snapshot)".into(),
        ));
    }
    let (stats, metadata_blocks) = if xml {
        generate_xml(output, &p, quiet)?
    } else {
        generate_binary(output, &p, quiet)?
    };
    if !quiet {
        eprintln!("{name}: {}", summary(&stats, metadata_blocks));
    }
    Ok(())
}

fn generate_binary(
    output: &Path,
    p: &GenParams,
    quiet: bool,
) -> Result<(ModelStats, Option<u64>), Failure> {
    // Open first: a wrong path fails before the model is built.
    let dev = open_output(output, OpenMode::ReadWriteExclusive)?;
    let model = Model::build(p).map_err(usage)?;
    let stats = model.stats();
    let r = build_pool(&dev, Overrides::default(), p.metadata_snap, |b, pass| {
        let title = match pass {
            Pass::Validate => "Checking",
            Pass::Write => "Writing",
        };
        let mut c = counted(b, title, quiet, &stats);
        emit(&model, &mut c).map_err(|e| BuildError::Input(e.to_string()))
    });
    match r {
        Ok(built) => Ok((stats, Some(built.metadata_blocks_used))),
        Err(e @ BuildError::TooSmall { .. }) => Err(Failure::new(
            EXIT_NO_INPUT,
            format!(
                "{}: Output file too small: {e} (nothing was written)",
                output.display()
            ),
        )),
        Err(BuildError::Metadata(e)) => Err(Failure::new(
            if e.is_io() { EXIT_IO } else { EXIT_INTERNAL },
            format!("{}: {e}", output.display()),
        )),
        Err(BuildError::Input(msg) | BuildError::InputIo(msg)) => Err(Failure::new(
            EXIT_INTERNAL,
            format!("generated pool refused: {msg}"),
        )),
    }
}

fn generate_xml(
    output: &Path,
    p: &GenParams,
    quiet: bool,
) -> Result<(ModelStats, Option<u64>), Failure> {
    if let Ok(md) = std::fs::metadata(output) {
        if md.is_dir() || md.file_type().is_block_device() {
            return Err(usage(format!(
                "{}: is a directory or block device; --format xml writes a file",
                output.display()
            )));
        }
    }
    let model = Model::build(p).map_err(usage)?;
    let stats = model.stats();
    let io_fail = |e: io::Error| Failure::new(EXIT_IO, format!("{}: {e}", output.display()));
    let f = File::create(output).map_err(io_fail)?;
    let mut w = XmlWriter::new(BufWriter::with_capacity(1 << 20, f));
    emit(&model, &mut counted(&mut w, "Writing", quiet, &stats)).map_err(io_fail)?;
    let f = w
        .into_inner()
        .into_inner()
        .map_err(|e| io_fail(e.into_error()))?;
    if f.metadata().map_err(io_fail)?.is_file() {
        f.sync_all().map_err(io_fail)?;
    }
    Ok((stats, None))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(args: &[&str]) -> clap::ArgMatches {
        let mut v = vec!["thin_generate_metadata"];
        v.extend_from_slice(args);
        command("thin_generate_metadata")
            .try_get_matches_from(v)
            .unwrap()
    }

    #[test]
    fn options_set_params() {
        let p = params(&matches(&[
            "-o",
            "x",
            "--origins",
            "4",
            "--segments",
            "30000",
            "--snaps",
            "5",
            "--seed",
            "3",
            "--fill",
            "0.5",
            "--headroom",
            "2",
            "--metadata-snap",
        ]))
        .unwrap();
        assert_eq!((p.origins, p.segments, p.snaps, p.seed), (4, 30000, 5, 3));
        assert_eq!((p.fill, p.headroom, p.metadata_snap), (0.5, 2.0, true));
        assert_eq!(p.partial, GenParams::default().partial);
        for bad in [
            ["--origins", "x"],
            ["--fill", "2"],
            ["--data-block-size", "100"],
        ] {
            let mut a = vec!["-o", "x"];
            a.extend_from_slice(&bad);
            assert_eq!(params(&matches(&a)).unwrap_err().code, EXIT_USAGE);
        }
    }
}
