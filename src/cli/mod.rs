//! The command edge: argument parsing, messages and exit codes. Each tool is
//! a thin shell over the library.
//!
//! Exit codes (never 2: LVM reads a thin_check status of 2 as "not
//! installed" and activates the pool unchecked):
//! 0 success; 64 usage error; 65 metadata damaged or inconsistent;
//! 66 input missing or not usable; 70 internal error; 74 I/O error;
//! 75 device busy (in use by a live pool).

pub mod progress;
pub mod snap_check;
pub mod snap_dump;
pub mod snap_merge;
pub mod thin_check;
pub mod thin_delta;
pub mod thin_dump;
pub mod thin_extract;
pub mod thin_generate_metadata;
pub mod thin_ls;
pub mod thin_merge;
pub mod thin_message;
pub mod thin_metadata_pack;
pub mod thin_metadata_size;
pub mod thin_metadata_unpack;
pub mod thin_migrate;
pub mod thin_repair;
pub mod thin_restore;
pub mod thin_rmap;
pub mod thin_shrink;
pub mod thin_trim;

use std::ffi::OsString;
use std::path::Path;

use crate::pdata::io::{BlockDevice, OpenError, OpenMode};

pub const EXIT_OK: i32 = 0;
pub const EXIT_USAGE: i32 = 64;
pub const EXIT_DAMAGED: i32 = 65;
pub const EXIT_NO_INPUT: i32 = 66;
pub const EXIT_INTERNAL: i32 = 70;
pub const EXIT_IO: i32 = 74;
pub const EXIT_BUSY: i32 = 75;

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// A failure at the command edge: its one-line message and exit code.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl Failure {
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// What a tool's run returns on success: nothing (exit 0) or an exit code.
pub trait ToolExit {
    fn code(self) -> i32;
}
impl ToolExit for () {
    fn code(self) -> i32 {
        EXIT_OK
    }
}
impl ToolExit for i32 {
    fn code(self) -> i32 {
        self
    }
}

/// A tool's life: parse `args` with `cmd`, run, and report a failure as
/// one line on stderr with its exit code.
pub fn run_tool<T: ToolExit>(
    name: &str,
    args: Vec<OsString>,
    cmd: clap::Command,
    run: impl FnOnce(&clap::ArgMatches) -> Result<T, Failure>,
) -> i32 {
    let m = match parse_args(cmd, args) {
        Ok(m) => m,
        Err(code) => return code,
    };
    match run(&m) {
        Ok(t) => t.code(),
        Err(f) => report(name, f),
    }
}

/// A tool's entry point: its name and its full argv (argv[0] first).
pub type ToolMain = fn(&'static str, Vec<OsString>) -> i32;

/// The tools, by the name they are called as.
pub const TOOLS: &[(&str, ToolMain)] = &[
    ("snap_check", snap_check::main),
    ("snap_dump", snap_dump::main),
    ("snap_merge", snap_merge::main),
    ("thin_check", thin_check::main),
    ("thin_delta", thin_delta::main),
    ("thin_dump", thin_dump::main),
    ("thin_extract", thin_extract::main),
    ("thin_generate_metadata", thin_generate_metadata::main),
    ("thin_ls", thin_ls::main),
    ("thin_merge", thin_merge::main),
    ("thin_message", thin_message::main),
    ("thin_metadata_pack", thin_metadata_pack::main),
    ("thin_metadata_size", thin_metadata_size::main),
    ("thin_metadata_unpack", thin_metadata_unpack::main),
    ("thin_migrate", thin_migrate::main),
    ("thin_repair", thin_repair::main),
    ("thin_restore", thin_restore::main),
    ("thin_rmap", thin_rmap::main),
    ("thin_shrink", thin_shrink::main),
    ("thin_trim", thin_trim::main),
];

/// Multi-call entry: dispatch on argv[0]'s basename, or on the first
/// argument when called as `thinmeta`.
pub fn dispatch(args: Vec<OsString>) -> i32 {
    let argv0 = args.first().map(|a| {
        Path::new(a)
            .file_name()
            .unwrap_or(a.as_os_str())
            .to_string_lossy()
            .into_owned()
    });
    let argv0 = argv0.unwrap_or_else(|| "thinmeta".into());
    if let Some((name, f)) = TOOLS.iter().find(|(n, _)| *n == argv0) {
        return f(name, args);
    }
    let mut rest = args.into_iter().skip(1);
    match rest.next().map(|a| a.to_string_lossy().into_owned()) {
        Some(cmd) if TOOLS.iter().any(|(n, _)| *n == cmd) => {
            let (name, f) = TOOLS.iter().find(|(n, _)| *n == cmd).unwrap();
            let mut v = vec![OsString::from(*name)];
            v.extend(rest);
            f(name, v)
        }
        Some(v) if v == "-V" || v == "--version" => {
            println!("{VERSION}");
            EXIT_OK
        }
        Some(v) if v == "--install-links" => install_links(rest.next()),
        Some(v) if v == "-h" || v == "--help" => {
            print!("{}", usage());
            EXIT_OK
        }
        Some(other) => {
            eprintln!("thinmeta: unknown command '{other}'\n{}", usage());
            EXIT_USAGE
        }
        None => {
            eprint!("{}", usage());
            EXIT_USAGE
        }
    }
}

fn usage() -> String {
    let mut s = String::from("Usage: thinmeta <command> [args...]   (or call a command through a symlink named after it)\n       thinmeta --install-links DIR\ncommands:\n");
    for (n, _) in TOOLS {
        s.push_str("  ");
        s.push_str(n);
        s.push('\n');
    }
    s
}

/// Create `DIR/<tool>` symlinks to this binary for every tool.
fn install_links(dir: Option<OsString>) -> i32 {
    let Some(dir) = dir else {
        eprintln!("thinmeta: --install-links needs a directory");
        return EXIT_USAGE;
    };
    let exe = match std::env::current_exe().and_then(|p| p.canonicalize()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("thinmeta: cannot find my own executable: {e}");
            return EXIT_INTERNAL;
        }
    };
    let dir = Path::new(&dir);
    for (name, _) in TOOLS {
        let link = dir.join(name);
        if link.symlink_metadata().is_ok() {
            if let Err(e) = std::fs::remove_file(&link) {
                eprintln!("thinmeta: cannot replace {}: {e}", link.display());
                return EXIT_IO;
            }
        }
        if let Err(e) = std::os::unix::fs::symlink(&exe, &link) {
            eprintln!("thinmeta: cannot create {}: {e}", link.display());
            return EXIT_IO;
        }
        println!("{} -> {}", link.display(), exe.display());
    }
    EXIT_OK
}

/// Parse with clap, mapping its outcomes to our exit codes: help and
/// version print and exit 0, any usage error exits 64 (clap would use 2).
pub fn parse_args(cmd: clap::Command, args: Vec<OsString>) -> Result<clap::ArgMatches, i32> {
    let mut cmd = cmd;
    cmd.build();
    let args = drop_empty_args(&cmd, args);
    // `-V` prints the bare version (clap would print "NAME VERSION"), also
    // when the required arguments are missing (`thin_check -V`).
    let has_v = args.iter().skip(1).any(|a| a == "-V" || a == "--version");
    match cmd.try_get_matches_from(args) {
        Ok(m) if m.get_flag("version") => {
            println!("{VERSION}");
            Err(EXIT_OK)
        }
        Ok(m) => Ok(m),
        Err(e) => {
            use clap::error::ErrorKind;
            if has_v && e.kind() == ErrorKind::MissingRequiredArgument {
                println!("{VERSION}");
                return Err(EXIT_OK);
            }
            let _ = e.print();
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => Err(EXIT_OK),
                _ => Err(EXIT_USAGE),
            }
        }
    }
}

/// Drop the empty-string arguments that are not an option's value.
///
/// LVM passes its configured tool options through unchanged, and the
/// defaults of `thin_repair_options` and `thin_restore_options` are
/// `[ "" ]`: `thin_repair "" -i IN -o OUT`. An empty word in an argument's
/// place means nothing, so every tool ignores it. An empty word in a
/// value's place (`-o ""`, `--dev-id ""`) stays, and the option refuses it,
/// so a value never shifts onto the next word. `cmd` must be built.
pub fn drop_empty_args(cmd: &clap::Command, args: Vec<OsString>) -> Vec<OsString> {
    // Does this option take its value from the next word when none is attached?
    let takes_value = |a: &clap::Arg| {
        !a.is_positional()
            && !a.is_require_equals_set()
            && a.get_num_args().is_some_and(|r| r.takes_values())
    };
    let long_takes_value = |name: &str| {
        cmd.get_arguments().any(|a| {
            takes_value(a)
                && (a.get_long() == Some(name)
                    || a.get_all_aliases().into_iter().flatten().any(|x| x == name))
        })
    };
    let short_takes_value = |c: char| {
        cmd.get_arguments().any(|a| {
            takes_value(a)
                && (a.get_short() == Some(c)
                    || a.get_all_short_aliases()
                        .into_iter()
                        .flatten()
                        .any(|x| x == c))
        })
    };
    let mut out = Vec::with_capacity(args.len());
    let mut value_next = false;
    let mut only_positionals = false;
    for (i, a) in args.into_iter().enumerate() {
        if i == 0 || value_next {
            // argv[0], or an option's value (even an empty one).
            value_next = false;
            out.push(a);
            continue;
        }
        if a.is_empty() {
            continue;
        }
        let s = a.to_string_lossy();
        if only_positionals {
            // After `--` every word is an argument.
        } else if s == "--" {
            only_positionals = true;
        } else if let Some(long) = s.strip_prefix("--") {
            value_next = !long.contains('=') && long_takes_value(long);
        } else if let Some(shorts) = s.strip_prefix('-') {
            // A cluster such as `-qo FILE`: the first value-taking letter
            // takes the rest of the word, or the next word when it is last.
            if let Some((j, c)) = shorts.char_indices().find(|&(_, c)| short_takes_value(c)) {
                value_next = j + c.len_utf8() == shorts.len();
            }
        }
        out.push(a);
    }
    out
}

/// The `-q/--quiet` argument every tool takes.
pub fn quiet_arg() -> clap::Arg {
    clap::Arg::new("quiet")
        .short('q')
        .long("quiet")
        .action(clap::ArgAction::SetTrue)
        .help("Suppress output messages, return only exit code.")
}

/// The `-V/--version` argument every tool takes (handled in [`parse_args`]).
pub fn version_arg() -> clap::Arg {
    clap::Arg::new("version")
        .short('V')
        .long("version")
        .help("Print version")
        .action(clap::ArgAction::SetTrue)
}

/// Open a tool's input metadata device, turning failures into messages
/// that name it. A file that holds XML text is refused: the binary metadata
/// readers cannot read a dump (see [`xml_input_failure`]).
pub fn open_device(path: &Path, mode: OpenMode) -> Result<BlockDevice, Failure> {
    let dev = BlockDevice::open(path, mode).map_err(|e| {
        if matches!(e, OpenError::TooSmall(_)) && small_file_is_xml(path) {
            xml_input_failure(path)
        } else {
            open_failure(path, e)
        }
    })?;
    let mut head = vec![0u8; crate::pdata::BLOCK_SIZE];
    if dev.read_block(0, &mut head).is_ok() && crate::pdata::io::looks_like_xml(&head) {
        return Err(xml_input_failure(path));
    }
    Ok(dev)
}

/// Open the device a tool writes new metadata to (thin_restore's and
/// thin_repair's `-o`): whatever it holds is overwritten, so it is not
/// sniffed for XML.
pub fn open_output(path: &Path, mode: OpenMode) -> Result<BlockDevice, Failure> {
    BlockDevice::open(path, mode).map_err(|e| output_open_failure(path, e))
}

/// The failure for an XML file given where binary metadata is expected.
/// The message holds the peer's sentence, which scripts look for.
pub fn xml_input_failure(path: &Path) -> Failure {
    Failure::new(
        EXIT_NO_INPUT,
        format!(
            "{}: This looks like XML.  This tool only supports the binary metadata format. (thin_restore writes metadata from an XML dump)",
            path.display()
        ),
    )
}

/// A regular file smaller than one block that holds XML text.
fn small_file_is_xml(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() < 4096)
        && std::fs::read(path).is_ok_and(|b| crate::pdata::io::looks_like_xml(&b))
}

fn open_failure_code(e: &OpenError) -> i32 {
    match e {
        OpenError::NotFound
        | OpenError::IsDirectory
        | OpenError::TooSmall(_)
        | OpenError::PermissionDenied => EXIT_NO_INPUT,
        OpenError::Busy => EXIT_BUSY,
        OpenError::Compressed | OpenError::NotSeekable => EXIT_USAGE,
        OpenError::Io(_) => EXIT_IO,
    }
}

/// Message and exit code for an input device `path` that could not be
/// opened. Messages hold the peer's phrases ("Couldn't find input file",
/// "Not a block device or regular file", "Permission denied", "Metadata
/// device/file too small.  Is this binary metadata?").
pub fn open_failure(path: &Path, e: OpenError) -> Failure {
    let code = open_failure_code(&e);
    let msg = match e {
        OpenError::NotFound => format!("{}: Couldn't find input file: {e}", path.display()),
        e => format!("{}: {e}", path.display()),
    };
    Failure::new(code, msg)
}

/// Message and exit code for an output device `path` that could not be opened.
pub fn output_open_failure(path: &Path, e: OpenError) -> Failure {
    let code = open_failure_code(&e);
    let msg = match e {
        OpenError::NotFound => format!("{}: Couldn't find output file: {e}", path.display()),
        OpenError::TooSmall(n) => format!(
            "{}: Output file too small ({n} bytes; thin metadata needs at least one 4096-byte block)",
            path.display()
        ),
        e => format!("{}: {e}", path.display()),
    };
    Failure::new(code, msg)
}

/// Message and exit code for a library error about device `path`.
pub fn thin_failure(path: &Path, e: &crate::thin::Error) -> Failure {
    use crate::thin::Error as E;
    let code = match e {
        E::Metadata { source, .. } if source.is_io() => EXIT_IO,
        E::Metadata { .. } | E::Inconsistent(_) => EXIT_DAMAGED,
        E::NoMetadataSnap => EXIT_NO_INPUT,
        E::Output(_) | E::Thread(_) => EXIT_IO,
    };
    Failure::new(code, format!("{}: {e}", path.display()))
}

/// Print a failure as one line on stderr and return its exit code.
pub fn report(tool: &str, f: Failure) -> i32 {
    eprintln!("{tool}: {}", f.message);
    f.code
}

/// `-m[=BLOCKNR]`: None for the live metadata, Some(None) for the held
/// metadata snapshot, Some(Some(b)) for a snapshot superblock at block b.
pub fn parse_metadata_snap(m: &clap::ArgMatches) -> Result<Option<Option<u64>>, Failure> {
    Ok(match m.get_one::<String>("metadata-snap") {
        None => None,
        Some(s) if s.is_empty() => Some(None),
        Some(s) => Some(Some(parse_u64(s).map_err(|e| {
            Failure::new(EXIT_USAGE, format!("--metadata-snap: {e}"))
        })?)),
    })
}

/// Parse a block number or count given on the command line.
pub fn parse_u64(s: &str) -> Result<u64, String> {
    s.parse::<u64>()
        .map_err(|_| format!("'{s}' is not a non-negative integer"))
}

/// `-i FILE` and `-o FILE` of the tools that write metadata.
pub fn input_output_args(cmd: clap::Command, input_help: &'static str) -> clap::Command {
    let file = |id: &'static str, short: char, help: &'static str| {
        clap::Arg::new(id)
            .short(short)
            .long(id)
            .value_name("FILE")
            .required(true)
            .value_parser(clap::value_parser!(std::path::PathBuf))
            .help(help)
    };
    cmd.arg(file("input", 'i', input_help))
        .arg(file("output", 'o', "Specify the output device"))
}

/// `--transaction-id`, `--data-block-size`, `--nr-data-blocks`: values that
/// replace what the input says (thin_restore, thin_repair).
pub fn override_args(cmd: clap::Command, data_block_size_help: &'static str) -> clap::Command {
    let num = |id: &'static str, name: &'static str, help: &'static str| {
        clap::Arg::new(id).long(id).value_name(name).help(help)
    };
    cmd.arg(num(
        "transaction-id",
        "NUM",
        "Override the transaction id if needed",
    ))
    .arg(num("data-block-size", "SECTORS", data_block_size_help))
    .arg(num(
        "nr-data-blocks",
        "NUM",
        "Override the number of data blocks if needed",
    ))
}

/// The overrides given on the command line.
pub fn parse_overrides(m: &clap::ArgMatches) -> Result<crate::thin::restore::Overrides, Failure> {
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
                "--data-block-size: invalid data block size: {s} sectors is not a multiple of 128 between 128 and 2097152"
            ),
            ))
        }
    };
    Ok(crate::thin::restore::Overrides {
        transaction_id: num("transaction-id")?,
        data_block_size,
        nr_data_blocks: num("nr-data-blocks")?,
    })
}

/// Message and exit code for a pool build from `input` onto `output` that failed.
pub fn build_failure(e: crate::thin::restore::BuildError, input: &Path, output: &Path) -> Failure {
    use crate::thin::restore::BuildError as E;
    match e {
        E::Input(msg) => Failure::new(EXIT_DAMAGED, format!("{}: {msg}", input.display())),
        E::InputIo(msg) => Failure::new(EXIT_IO, format!("{}: {msg}", input.display())),
        e @ E::TooSmall { .. } => Failure::new(
            EXIT_NO_INPUT,
            format!(
                "{}: Output file too small: {e} (nothing was written)",
                output.display()
            ),
        ),
        E::Metadata(e) => Failure::new(
            if e.is_io() { EXIT_IO } else { EXIT_INTERNAL },
            format!("{}: {e}", output.display()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn empty_words_go_unless_they_are_an_options_value() {
        let mut cmd = clap::Command::new("t")
            .arg(clap::Arg::new("INPUT"))
            .arg(clap::Arg::new("output").short('o').long("output"))
            .arg(
                clap::Arg::new("snap")
                    .short('m')
                    .num_args(0..=1)
                    .require_equals(true),
            )
            .arg(quiet_arg())
            .arg(clap::Arg::new("id").long("id").visible_alias("dev"));
        cmd.build();
        let cases: &[(&[&str], &[&str])] = &[
            (&["t", "", "in", ""], &["t", "in"]),
            (&["", "", "in"], &["", "in"]),
            (&["t", "-o", "", "in"], &["t", "-o", "", "in"]),
            (&["t", "--output", "", "in"], &["t", "--output", "", "in"]),
            (&["t", "--output=x", "", "in"], &["t", "--output=x", "in"]),
            (&["t", "-qo", "", "in"], &["t", "-qo", "", "in"]),
            (&["t", "-ox", "", "in"], &["t", "-ox", "in"]),
            (&["t", "-q", "", "in"], &["t", "-q", "in"]),
            (&["t", "-m", "", "in"], &["t", "-m", "in"]),
            (&["t", "--dev", "", "in"], &["t", "--dev", "", "in"]),
            (&["t", "--", "", "in"], &["t", "--", "in"]),
            (&["t", "--", "-o", "", "in"], &["t", "--", "-o", "in"]),
        ];
        for (given, want) in cases {
            assert_eq!(
                drop_empty_args(&cmd, words(given)),
                words(want),
                "{given:?}"
            );
        }
    }
}
