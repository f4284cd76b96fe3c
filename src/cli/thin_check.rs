//! thin_check: validate thin metadata; exit 0 only when it is sound.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, Command};

use super::progress::Progress;
use super::*;
use crate::pdata::BLOCK_SIZE;
use crate::thin::check::{check, CheckOptions, CheckReport, Severity};
use crate::thin::superblock::{set_flags, Superblock, NEEDS_CHECK_FLAG, SUPERBLOCK_LOCATION};

fn command(name: &'static str) -> Command {
    Command::new(name)
        .about("Validates thin provisioning metadata on a device or file.")
        .disable_version_flag(true)
        .arg(
            Arg::new("INPUT")
                .help("Specify the input device to check")
                .required(true)
                .value_parser(clap::value_parser!(PathBuf)),
        )
        .arg(
            Arg::new("auto-repair")
                .long("auto-repair")
                .action(ArgAction::SetTrue)
                .help("Auto repair trivial issues."),
        )
        .arg(
            Arg::new("clear-needs-check-flag")
                .long("clear-needs-check-flag")
                .action(ArgAction::SetTrue)
                .help("Clears the 'needs_check' flag in the superblock"),
        )
        .arg(
            Arg::new("ignore-non-fatal-errors")
                .long("ignore-non-fatal-errors")
                .action(ArgAction::SetTrue)
                .help("Only return a non-zero exit code if a fatal error is found."),
        )
        .arg(
            Arg::new("metadata-snap")
                .short('m')
                .long("metadata-snap")
                .action(ArgAction::SetTrue)
                .help("Check the metadata snapshot on a live pool"),
        )
        .arg(
            Arg::new("override-details-root")
                .long("override-details-root")
                .value_name("BLOCKNR")
                .help("Specify a details root to use"),
        )
        .arg(
            Arg::new("override-mapping-root")
                .long("override-mapping-root")
                .value_name("BLOCKNR")
                .help("Specify a mapping root to use"),
        )
        .arg(quiet_arg())
        .arg(
            Arg::new("skip-mappings")
                .long("skip-mappings")
                .action(ArgAction::SetTrue)
                .help("Don't check the mapping tree"),
        )
        .arg(
            Arg::new("super-block-only")
                .long("super-block-only")
                .action(ArgAction::SetTrue)
                .help("Only check the superblock."),
        )
        .arg(version_arg())
}

pub fn main(name: &'static str, args: Vec<OsString>) -> i32 {
    run_tool(name, args, command(name), |m| run(name, m))
}

fn opt_block(m: &clap::ArgMatches, id: &str) -> Result<Option<u64>, Failure> {
    m.get_one::<String>(id)
        .map(|s| parse_u64(s).map_err(|e| Failure::new(EXIT_USAGE, format!("--{id}: {e}"))))
        .transpose()
}

fn run(name: &str, m: &clap::ArgMatches) -> Result<i32, Failure> {
    let input = m.get_one::<PathBuf>("INPUT").unwrap();
    let quiet = m.get_flag("quiet");
    let mut opts = CheckOptions {
        sb_only: m.get_flag("super-block-only"),
        skip_mappings: m.get_flag("skip-mappings"),
        ignore_non_fatal: m.get_flag("ignore-non-fatal-errors"),
        metadata_snap: m.get_flag("metadata-snap"),
        override_mapping_root: opt_block(m, "override-mapping-root")?,
        override_details_root: opt_block(m, "override-details-root")?,
        keep_counts: false,
    };
    let clear_needs_check = m.get_flag("clear-needs-check-flag");
    let auto_repair = m.get_flag("auto-repair");
    let writes = clear_needs_check || auto_repair;
    let overrides = opts.override_mapping_root.is_some() || opts.override_details_root.is_some();
    // As the peer: --auto-repair needs the full check it repairs from, so
    // the options that weaken the check are refused with it.
    // (--clear-needs-check-flag accepts them and clears the flag after the
    // weaker check passes, as the peer does.)
    for (set, opt) in [
        (opts.ignore_non_fatal, "--ignore-non-fatal-errors"),
        (opts.skip_mappings, "--skip-mappings"),
        (opts.sb_only, "--super-block-only"),
    ] {
        if auto_repair && set {
            return Err(Failure::new(
                EXIT_USAGE,
                format!(
                    "--auto-repair cannot be combined with {opt}: it repairs from a full check"
                ),
            ));
        }
    }
    if opts.metadata_snap && overrides {
        return Err(Failure::new(
            EXIT_USAGE,
            "the override options apply to the live metadata; they cannot be combined with -m",
        ));
    }
    if writes && (opts.metadata_snap || overrides) {
        return Err(Failure::new(
            EXIT_USAGE,
            "--clear-needs-check-flag and --auto-repair change the live superblock; they cannot be combined with -m or the override options",
        ));
    }

    let mode = if opts.metadata_snap {
        OpenMode::ReadOnly
    } else {
        OpenMode::ReadOnlyExclusive
    };
    let dev = open_input(input, mode)?;
    refuse_xml(input, &dev)?;
    // Leaks are freed from the counts the check recomputes (the peer frees
    // them for --clear-needs-check-flag too, LVM's default).
    opts.keep_counts = writes && !opts.sb_only && !opts.skip_mappings;
    let mut progress = Progress::new("Checking mappings", quiet, true);
    let rep = check(&dev, &opts, &mut |d, t| progress.update(d, t));
    progress.finish();

    if !quiet {
        if let Some(sb) = &rep.superblock {
            println!("TRANSACTION_ID={}", sb.transaction_id);
            println!(
                "METADATA_FREE_BLOCKS={}",
                rep.metadata_free_blocks().unwrap_or(0)
            );
        }
        print_findings(name, input, &rep, opts.ignore_non_fatal);
    }

    let passed = rep.passed(opts.ignore_non_fatal);
    let fatal = rep
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Fatal)
        .count();
    let nonfatal = rep.findings.len() - fatal;
    // Leaked blocks (and the space maps' counters that go with them) and
    // nothing else that fails the check: rebuilding the space maps is safe.
    // Any other finding (fatal, or non-fatal and not ignored) refuses the
    // write.
    if writes && rep.space_maps_repairable(opts.ignore_non_fatal) && rep.counts.is_some() {
        // With --clear-needs-check-flag, leaks are fixed even when
        // --ignore-non-fatal-errors accepts them (as the peer).
        drop(dev);
        return fix_leaks(name, input, rep, quiet, opts.ignore_non_fatal);
    }
    if !passed {
        if !quiet {
            let hint = if rep.space_maps_repairable(false) {
                " (only leaked blocks or space-map counters: the pool is usable; --ignore-non-fatal-errors accepts them, --auto-repair or --clear-needs-check-flag rebuilds the space maps)"
            } else {
                ""
            };
            eprintln!(
                "{name}: {}: check failed: {fatal} fatal and {nonfatal} non-fatal problems{hint}",
                input.display()
            );
        }
        if writes && !quiet {
            eprintln!(
                "{name}: {}: only leaked blocks, space-map counters and the needs_check flag are fixed in place; nothing was written (use thin_repair)",
                input.display()
            );
        }
        let io = rep
            .findings
            .iter()
            .any(|f| f.io && f.severity == Severity::Fatal);
        return Ok(if io { EXIT_IO } else { EXIT_DAMAGED });
    }

    if writes {
        if let Some(sb) = &rep.superblock {
            if sb.needs_check() {
                drop(dev);
                clear_needs_check_flag(input, sb)?;
                if !quiet {
                    eprintln!("{name}: {}: cleared the needs_check flag", input.display());
                }
            }
        }
    }
    Ok(EXIT_OK)
}

/// --auto-repair (and --clear-needs-check-flag) of leaked blocks: rebuild
/// both space maps from the counts the check recomputed (crash-safe: new
/// blocks, then the superblock, needs_check cleared), then check again.
fn fix_leaks(
    name: &str,
    input: &Path,
    rep: CheckReport,
    quiet: bool,
    ignore_non_fatal: bool,
) -> Result<i32, Failure> {
    let (Some(checked), Some(counts)) = (rep.superblock, rep.counts) else {
        return Err(Failure::new(
            EXIT_DAMAGED,
            format!("{}: nothing to repair from", input.display()),
        ));
    };
    let dev = open_device(input, OpenMode::ReadWriteExclusive)?;
    let now = crate::thin::superblock::read_superblock(&dev, SUPERBLOCK_LOCATION).map_err(|e| {
        Failure::new(
            EXIT_DAMAGED,
            format!("{}: superblock: {e}", input.display()),
        )
    })?;
    if now != checked {
        return Err(Failure::new(
            EXIT_BUSY,
            format!(
                "{}: the superblock changed during the check; nothing was written",
                input.display()
            ),
        ));
    }
    crate::thin::check::rebuild_space_maps(
        &dev,
        &checked,
        counts,
        checked.flags & !NEEDS_CHECK_FLAG,
    )
    .map_err(|e| {
        Failure::new(
            if e.is_io() { EXIT_IO } else { EXIT_DAMAGED },
            format!("{}: rebuilding the space maps: {e}", input.display()),
        )
    })?;
    if !quiet {
        eprintln!(
            "{name}: {}: rebuilt the space maps: {} leaked data and {} leaked metadata blocks are free again",
            input.display(),
            rep.data_leaks,
            rep.metadata_leaks
        );
    }
    let again = check(&dev, &CheckOptions::default(), &mut |_, _| {});
    if !again.passed(ignore_non_fatal) {
        if !quiet {
            print_findings(name, input, &again, ignore_non_fatal);
        }
        return Ok(EXIT_DAMAGED);
    }
    Ok(EXIT_OK)
}

fn print_findings(name: &str, input: &Path, rep: &CheckReport, ignore_non_fatal: bool) {
    for f in &rep.findings {
        let tag = match f.severity {
            Severity::Fatal => "",
            Severity::NonFatal if ignore_non_fatal => "warning (ignored): ",
            Severity::NonFatal => "non-fatal: ",
        };
        eprintln!(
            "{name}: {}: {tag}{}: {}",
            input.display(),
            f.area,
            f.message
        );
    }
}

/// Clear needs_check: reopen read-write and exclusive, make sure the
/// superblock is still the one that was checked, then rewrite block 0 with
/// only the flags and checksum changed (inside the first sector, which the
/// device writes atomically) and flush.
fn clear_needs_check_flag(input: &Path, checked: &Superblock) -> Result<(), Failure> {
    let dev = open_device(input, OpenMode::ReadWriteExclusive)?;
    let mut block = vec![0u8; BLOCK_SIZE];
    let io = |e: crate::pdata::Error| Failure::new(EXIT_IO, format!("{}: {e}", input.display()));
    dev.read_block(SUPERBLOCK_LOCATION, &mut block)
        .map_err(io)?;
    let now = Superblock::parse(SUPERBLOCK_LOCATION, &block).map_err(|e| {
        Failure::new(
            EXIT_DAMAGED,
            format!("{}: superblock: {e}", input.display()),
        )
    })?;
    if &now != checked {
        return Err(Failure::new(
            EXIT_BUSY,
            format!(
                "{}: the superblock changed during the check; not clearing needs_check",
                input.display()
            ),
        ));
    }
    set_flags(&mut block, now.flags & !NEEDS_CHECK_FLAG);
    dev.write_block(SUPERBLOCK_LOCATION, &block).map_err(io)?;
    dev.sync().map_err(io)?;
    Ok(())
}

/// The peer's words for input that is not binary metadata; scripts look for them.
const TOO_SMALL: &str = "Metadata device/file too small.  Is this binary metadata?";
const LOOKS_LIKE_XML: &str =
    "This looks like XML.  This tool only supports the binary metadata format.";

/// The shared open path, with thin_check's words for input too small to be
/// metadata (an XML file, most often).
fn open_input(input: &Path, mode: OpenMode) -> Result<BlockDevice, Failure> {
    match BlockDevice::open(input, mode) {
        Ok(dev) => Ok(dev),
        Err(OpenError::TooSmall(size)) => {
            let mut head = Vec::new();
            // A regular file can be read again; a pipe cannot (it was consumed).
            if std::fs::metadata(input).is_ok_and(|m| m.is_file()) {
                if let Ok(f) = std::fs::File::open(input) {
                    use std::io::Read;
                    let _ = f.take(BLOCK_SIZE as u64).read_to_end(&mut head);
                }
            }
            let what = if looks_like_xml(&head) {
                xml_message()
            } else {
                format!("{TOO_SMALL} ({size} bytes; metadata starts with a 4096-byte superblock)")
            };
            Err(Failure::new(
                EXIT_NO_INPUT,
                format!("{}: {what}", input.display()),
            ))
        }
        Err(e) => Err(open_failure(input, e)),
    }
}

fn xml_message() -> String {
    format!("{LOOKS_LIKE_XML} (this is an XML dump; thin_restore writes it to a metadata device or file)")
}

/// XML where block 0 should hold a superblock: say so instead of reporting a
/// bad checksum. A valid superblock is never mistaken for XML.
fn refuse_xml(input: &Path, dev: &BlockDevice) -> Result<(), Failure> {
    let mut block = vec![0u8; BLOCK_SIZE];
    if dev.read_block(SUPERBLOCK_LOCATION, &mut block).is_err()
        || Superblock::parse(SUPERBLOCK_LOCATION, &block).is_ok()
        || !looks_like_xml(&block)
    {
        return Ok(());
    }
    Err(Failure::new(
        EXIT_NO_INPUT,
        format!("{}: {}", input.display(), xml_message()),
    ))
}

/// Text that starts (after a byte-order mark and white space) with an XML
/// declaration or one of the thin dump's elements.
fn looks_like_xml(head: &[u8]) -> bool {
    let head = head.strip_prefix(b"\xef\xbb\xbf").unwrap_or(head);
    let start = head
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(head.len());
    let text = &head[start..];
    [&b"<?xml"[..], b"<superblock", b"<!--"]
        .iter()
        .any(|p| text.starts_with(p))
}
