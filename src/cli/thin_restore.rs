//! thin_restore: write thin metadata from an XML dump.

use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

use clap::{Arg, Command};

use super::progress::Progress;
use super::*;
use crate::thin::restore::{restore_xml, BuildError, Overrides, Pass};

fn command(name: &'static str) -> Command {
    Command::new(name)
        .about("Convert XML format metadata to binary.")
        .disable_version_flag(true)
        .arg(
            Arg::new("input")
                .short('i')
                .long("input")
                .value_name("FILE")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("Specify the input xml"),
        )
        .arg(
            Arg::new("output")
                .short('o')
                .long("output")
                .value_name("FILE")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf))
                .help("Specify the output device"),
        )
        .arg(quiet_arg())
        .arg(
            Arg::new("transaction-id")
                .long("transaction-id")
                .value_name("NUM")
                .help("Override the transaction id if needed"),
        )
        .arg(
            Arg::new("data-block-size")
                .long("data-block-size")
                .value_name("SECTORS")
                .help("Override the data block size if needed"),
        )
        .arg(
            Arg::new("nr-data-blocks")
                .long("nr-data-blocks")
                .value_name("NUM")
                .help("Override the number of data blocks if needed"),
        )
        .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    let m = match parse_args(command(name), args) {
        Ok(m) => m,
        Err(code) => return code,
    };
    match run(&m) {
        Ok(()) => EXIT_OK,
        Err(f) => report(name, f),
    }
}

/// The thin_restore / thin_repair overrides from the command line.
pub fn overrides(m: &clap::ArgMatches) -> Result<Overrides, Failure> {
    let num = |opt: &str| -> Result<Option<u64>, Failure> {
        m.get_one::<String>(opt)
            .map(|s| parse_u64(s).map_err(|e| Failure::new(EXIT_USAGE, format!("--{opt}: {e}"))))
            .transpose()
    };
    let data_block_size = match num("data-block-size")? {
        None => None,
        Some(s) if (128..=2_097_152).contains(&s) && s % 128 == 0 => Some(s as u32),
        Some(s) => {
            return Err(Failure::new(
                EXIT_USAGE,
                format!(
                "--data-block-size: {s} sectors is not a multiple of 128 between 128 and 2097152"
            ),
            ))
        }
    };
    Ok(Overrides {
        transaction_id: num("transaction-id")?,
        data_block_size,
        nr_data_blocks: num("nr-data-blocks")?,
    })
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
    let f = File::open(path)?;
    let total = f.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, f);
    let gz = io::BufRead::fill_buf(&mut r)?.starts_with(&[0x1f, 0x8b]);
    let title = match pass {
        Pass::Validate => "Checking XML",
        Pass::Write => "Restoring",
    };
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
    let overrides = overrides(m)?;

    let md = std::fs::metadata(input)
        .map_err(|e| Failure::new(EXIT_NO_INPUT, format!("{}: {e}", input.display())))?;
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
    let dev = open_device(output, OpenMode::ReadWriteExclusive)?;
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
        Err(BuildError::Input(msg)) => Err(Failure::new(
            EXIT_DAMAGED,
            format!("{}: {msg}", input.display()),
        )),
        Err(BuildError::InputIo(msg)) => {
            Err(Failure::new(EXIT_IO, format!("{}: {msg}", input.display())))
        }
        Err(e @ BuildError::TooSmall { .. }) => Err(Failure::new(
            EXIT_NO_INPUT,
            format!("{}: too small: {e} (nothing was written)", output.display()),
        )),
        Err(BuildError::Metadata(e)) => Err(Failure::new(
            if e.is_io() { EXIT_IO } else { EXIT_INTERNAL },
            format!("{}: {e}", output.display()),
        )),
    }
}
