//! thin_restore: write thin metadata from an XML dump.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use clap::Command;

use super::progress::Progress;
use super::*;
use crate::thin::restore::{restore_xml, Pass};

fn command(name: &'static str) -> Command {
    let cmd = Command::new(name)
        .about("Convert XML format metadata to binary.")
        .disable_version_flag(true);
    let cmd = input_output_args(cmd, "Specify the input xml").arg(quiet_arg());
    override_args(cmd, "Override the data block size if needed").arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), run)
}

/// Counts bytes read for the progress bar.
struct Counting<R> {
    inner: R,
    read: u64,
    total: u64,
    progress: Progress,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.read += n as u64;
        self.progress.update(self.read, self.total);
        Ok(n)
    }
}

fn open_xml(path: &Path, pass: Pass, quiet: bool) -> io::Result<Box<dyn Read + Send>> {
    let title = match pass {
        Pass::Validate => "Checking XML",
        Pass::Write => "Restoring",
    };
    open_xml_file(path, title, quiet)
}

/// Open an XML dump (plain or gzip) for reading, with a progress bar titled `title`.
pub(super) fn open_xml_file(
    path: &Path,
    title: &'static str,
    quiet: bool,
) -> io::Result<Box<dyn Read + Send>> {
    let f = File::open(path)?;
    let total = f.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let gz = io::BufRead::fill_buf(&mut r)?.starts_with(&[0x1f, 0x8b]);
    let counted = Counting {
        inner: r,
        read: 0,
        total,
        progress: Progress::new(title, quiet, true),
    };
    Ok(if gz {
        Box::new(flate2::read::MultiGzDecoder::new(counted))
    } else {
        Box::new(counted)
    })
}

fn run(m: &clap::ArgMatches) -> Result<(), Failure> {
    let input = m.get_one::<PathBuf>("input").unwrap();
    let output = m.get_one::<PathBuf>("output").unwrap();
    let quiet = m.get_flag("quiet");
    let overrides = parse_overrides(m)?;

    let md = std::fs::metadata(input).map_err(|e| open_failure(input, e.into()))?;
    if !md.is_file() {
        // Two passes read the input twice: it must be a file.
        return Err(Failure::new(
            EXIT_NO_INPUT,
            format!(
                "{}: not a regular file (the XML is read twice: once to check it, once to write)",
                input.display()
            ),
        ));
    }
    let dev = open_output(output, OpenMode::ReadWriteExclusive)?;
    let r = restore_xml(&dev, overrides, |pass| open_xml(input, pass, quiet));
    match r {
        Ok(built) => {
            if !quiet {
                for n in &built.notes {
                    eprintln!("thin_restore: {}: {n}", input.display());
                }
            }
            Ok(())
        }
        Err(e) => {
            let input_error = matches!(e, crate::thin::restore::BuildError::Input(_));
            let mut f = build_failure(e, input, output);
            if input_error && is_binary_metadata(input) {
                f.message.push_str(
                    " (this is binary thin metadata, not XML: thin_restore reads what thin_dump writes)",
                );
            }
            Err(f)
        }
    }
}

/// A file that starts with a thin superblock (its magic number at byte 32).
fn is_binary_metadata(path: &Path) -> bool {
    use std::os::unix::fs::FileExt;
    let mut magic = [0u8; 8];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut magic, 32))
        .is_ok_and(|_| u64::from_le_bytes(magic) == crate::thin::superblock::THIN_SUPERBLOCK_MAGIC)
}
