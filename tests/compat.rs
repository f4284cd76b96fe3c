//! Drop-in compatibility at the command edge (issue 9, items 1, 6 and 7):
//! empty arguments as LVM passes them, thin_dump's superblock overrides
//! without --repair, and the peer's phrases in our error messages (scripts
//! and the peer's own test suite look for them).

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A failure: not 0, never 2 (LVM's "not installed"), one line, no panic.
fn failed(o: &Output, what: &str) -> String {
    assert_one_line_error(o, what);
    stderr(o)
}

fn fixture_copy(dir: &Path) -> PathBuf {
    unpack(&fixture_dir().join("meta.img.gz"), dir, "meta.img")
}

/// A zero-filled file of `len` bytes.
fn zeroed(dir: &Path, name: &str, len: u64) -> PathBuf {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(len).unwrap();
    path
}

fn xml_dump(dir: &Path, meta: &Path) -> PathBuf {
    let out = run("thin_dump", &[p(meta)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let xml = dir.join("dump.xml");
    std::fs::write(&xml, &out.stdout).unwrap();
    xml
}

fn check_passes(meta: &Path) {
    let out = run("thin_check", &[p(meta)]);
    assert_eq!(out.status.code(), Some(0), "thin_check: {}", stderr(&out));
}

/// The device lines of a dump (the superblock line and `<def>` names differ
/// between a pool and its rebuilt copy; what each device maps does not).
fn devices(meta: &Path) -> String {
    let out = run("thin_ls", &[p(meta)]);
    assert_eq!(out.status.code(), Some(0), "thin_ls: {}", stderr(&out));
    stdout(&out)
}

// ---------------------------------------------------------------------------
// Item 1: empty arguments

#[test]
fn lvm_empty_arguments_are_ignored_by_every_tool_lvm_calls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let meta = fixture_copy(d);
    let m = p(&meta);
    let plain = run("thin_dump", &[m]);
    assert_eq!(plain.status.code(), Some(0));

    // thin_check, as LVM runs it: `-q --clear-needs-check-flag` plus
    // whatever thin_check_options holds, possibly an empty word.
    for args in [
        vec!["", m],
        vec![m, ""],
        vec!["-q", "", "--clear-needs-check-flag", m, ""],
    ] {
        let out = run("thin_check", &args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
    }

    // thin_dump: the same dump as without the empty words.
    for args in [vec!["", m], vec![m, ""], vec!["", m, "", ""]] {
        let out = run("thin_dump", &args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert_eq!(out.stdout, plain.stdout, "{args:?}");
    }

    // thin_repair: LVM's default thin_repair_options is [ "" ].
    for (i, args) in [
        vec!["-i", m, "-o", "OUT", ""],
        vec!["", "-i", m, "-o", "OUT"],
        vec!["", "-i", m, "", "-o", "OUT", ""],
    ]
    .into_iter()
    .enumerate()
    {
        let out_path = zeroed(d, &format!("repaired{i}"), 4 << 20);
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "OUT" { p(&out_path) } else { a })
            .collect();
        let out = run("thin_repair", &args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        check_passes(&out_path);
        assert_eq!(devices(&out_path), devices(&meta), "{args:?}");
    }

    // thin_restore: LVM's default thin_restore_options is [ "" ].
    let xml = xml_dump(d, &meta);
    for (i, args) in [
        vec!["-i", p(&xml), "-o", "OUT", ""],
        vec!["", "-i", p(&xml), "-o", "OUT"],
    ]
    .into_iter()
    .enumerate()
    {
        let out_path = zeroed(d, &format!("restored{i}"), 4 << 20);
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "OUT" { p(&out_path) } else { a })
            .collect();
        let out = run("thin_restore", &args);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        check_passes(&out_path);
        assert_eq!(devices(&out_path), devices(&meta), "{args:?}");
    }

    // The other tools too.
    let out = run("thin_ls", &["", m, ""]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(
        "thin_delta",
        &["", "--thin1", "1", "", "--thin2", "2", m, ""],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run(
        "thin_metadata_size",
        &["", "-b", "64k", "-s", "1g", "-m", "10", ""],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

#[test]
fn an_empty_option_value_is_refused_not_dropped() {
    // `-o "" META` must not become `-o META`: that would write over the
    // input. An empty word in a value's place stays the value, and the
    // option refuses it.
    let dir = tempfile::tempdir().unwrap();
    let meta = fixture_copy(dir.path());
    let m = p(&meta);
    let before = std::fs::read(&meta).unwrap();
    for args in [
        vec!["-o", "", m],
        vec!["--output", "", m],
        vec!["-qo", "", m],
        vec!["--dev-id", "", m],
        vec!["--transaction-id", "", m],
    ] {
        let out = run("thin_dump", &args);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let out_path = zeroed(dir.path(), "out", 4 << 20);
    let out = run("thin_repair", &["-i", "", m, "-o", p(&out_path)]);
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert_eq!(std::fs::read(&meta).unwrap(), before, "input untouched");
    assert!(
        std::fs::read(&out_path).unwrap().iter().all(|&b| b == 0),
        "nothing written"
    );
    // Only empty words: the input is still required.
    let out = run("thin_dump", &[""]);
    assert_eq!(out.status.code(), Some(64));
}

// ---------------------------------------------------------------------------
// Item 6: thin_dump --transaction-id/--data-block-size/--nr-data-blocks

#[test]
fn dump_overrides_without_repair_replace_the_printed_superblock_fields() {
    let dir = tempfile::tempdir().unwrap();
    let meta = fixture_copy(dir.path());
    let m = p(&meta);
    // The fixture: transaction 5, 128-sector blocks, 256 data blocks.
    let dump = |args: &[&str]| {
        let mut all = vec![m];
        all.extend_from_slice(args);
        let out = run("thin_dump", &all);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        assert!(out.stderr.is_empty(), "{args:?}: {}", stderr(&out));
        stdout(&out)
    };
    let plain = dump(&[]);
    assert!(plain.starts_with(
        "<superblock uuid=\"\" time=\"2\" transaction=\"5\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"256\">"
    ));
    let body = |s: &str| s.split_once('\n').unwrap().1.to_string();
    for (args, attr) in [
        (["--transaction-id", "2345"], "transaction=\"2345\""),
        (["--data-block-size", "8192"], "data_block_size=\"8192\""),
        (["--nr-data-blocks", "234500"], "nr_data_blocks=\"234500\""),
    ] {
        let out = dump(&args);
        assert!(
            out.lines().next().unwrap().contains(attr),
            "{args:?}: {out}"
        );
        assert_eq!(body(&out), body(&plain), "{args:?}: mappings unchanged");
    }
    let all = [
        "--transaction-id",
        "9",
        "--data-block-size",
        "256",
        "--nr-data-blocks",
        "1000",
    ];
    assert_eq!(
        dump(&all).lines().next().unwrap(),
        "<superblock uuid=\"\" time=\"2\" transaction=\"9\" version=\"2\" data_block_size=\"256\" nr_data_blocks=\"1000\">"
    );
    // As the peer: the transaction id and the pool size are never lowered.
    assert_eq!(
        dump(&["--transaction-id", "3", "--nr-data-blocks", "10"]),
        plain
    );

    // The same values in the other formats.
    let mut args = vec!["-f", "human_readable"];
    args.extend_from_slice(&all);
    assert_eq!(
        dump(&args).lines().next().unwrap(),
        "begin superblock: \"\", 2, 9, 0, 2, 256, 1000"
    );
    let mut args = vec!["-f", "json"];
    args.extend_from_slice(&all);
    let json = dump(&args);
    assert!(
        json.starts_with(
            "{\"superblock\":{\"uuid\":\"\",\"time\":2,\"transaction\":9,\"flags\":0,\"version\":2,\"data_block_size\":256,\"nr_data_blocks\":1000,"
        ),
        "{json}"
    );
    // With --skip-mappings and --dev-id as well.
    let out = dump(&["--skip-mappings", "--dev-id", "1", "--transaction-id", "77"]);
    assert!(out.starts_with("<superblock uuid=\"\" time=\"2\" transaction=\"77\" "));
    assert!(out.contains("<device dev_id=\"1\"") && !out.contains("dev_id=\"2\""));

    // A dump with overrides restores to a pool with those values.
    let xml = dir.path().join("over.xml");
    std::fs::write(&xml, dump(&["--transaction-id", "42"])).unwrap();
    let out_path = zeroed(dir.path(), "restored", 4 << 20);
    let out = run("thin_restore", &["-i", p(&xml), "-o", p(&out_path)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = run("thin_check", &[p(&out_path)]);
    assert!(
        stdout(&out).contains("TRANSACTION_ID=42"),
        "{}",
        stdout(&out)
    );

    // An impossible block size is refused, in the peer's words.
    let out = run("thin_dump", &[m, "--data-block-size", "100"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(failed(&out, "bad block size").contains("data block size"));
}

// ---------------------------------------------------------------------------
// Item 7: the peer's phrases

/// The binary-metadata readers, each with the arguments it needs before
/// the input.
const READERS: &[(&str, &[&str])] = &[
    ("thin_check", &[]),
    ("thin_dump", &[]),
    ("thin_ls", &[]),
    ("thin_rmap", &["--region", "0..1"]),
    ("thin_delta", &["--thin1", "1", "--thin2", "2"]),
    ("thin_dump", &["--repair"]),
];

fn run_reader(tool: &str, pre: &[&str], input: &Path) -> Output {
    let mut args = pre.to_vec();
    args.push(p(input));
    run(tool, &args)
}

/// A large XML dump (more than one block), as the peer's test writes one.
fn big_xml(dir: &Path) -> PathBuf {
    let meta = fixture_copy(dir);
    let mut text = run("thin_dump", &[p(&meta)]).stdout;
    let one = text.clone();
    while text.len() < 64 << 10 {
        text.extend_from_slice(&one);
    }
    let xml = dir.join("big.xml");
    std::fs::write(&xml, text).unwrap();
    xml
}

#[test]
fn readers_name_unusable_inputs_in_the_peers_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let tiny = zeroed(d, "tiny", 1024);
    let zero = zeroed(d, "zero", 4 << 20);
    let xml = big_xml(d);
    let small_xml = xml_dump(d, &fixture_copy(d));
    assert!(std::fs::metadata(&small_xml).unwrap().len() < 4096);
    let gz_xml = d.join("big.xml.gz");
    {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(
            std::fs::File::create(&gz_xml).unwrap(),
            flate2::Compression::fast(),
        );
        e.write_all(&std::fs::read(&xml).unwrap()).unwrap();
        e.finish().unwrap();
    }
    // The fixture with one byte of its superblock changed.
    let flipped = fixture_copy(d);
    let f = open_rw(&flipped);
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, 100).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], 100).unwrap();

    let cases: &[(&str, PathBuf, &str)] = &[
        (
            "missing",
            d.join("no-such-file"),
            "Couldn't find input file",
        ),
        (
            "directory",
            d.to_path_buf(),
            "Not a block device or regular file",
        ),
        (
            "tiny",
            tiny.clone(),
            "Metadata device/file too small.  Is this binary metadata?",
        ),
        (
            "XML",
            xml.clone(),
            "This looks like XML.  This tool only supports the binary metadata format.",
        ),
        (
            "small XML",
            small_xml.clone(),
            "This looks like XML.  This tool only supports the binary metadata format.",
        ),
        (
            "gzip XML",
            gz_xml.clone(),
            "This looks like XML.  This tool only supports the binary metadata format.",
        ),
    ];
    for (tool, pre) in READERS {
        for (what, input, phrase) in cases {
            let out = run_reader(tool, pre, input);
            let err = failed(&out, &format!("{tool} {pre:?} on {what}"));
            assert!(
                err.contains(phrase),
                "{tool} {pre:?} on {what}: wanted {phrase:?}: {err}"
            );
            assert!(err.contains(p(input)), "names the input: {err}");
        }
        if *pre != ["--repair"] {
            for (what, input) in [("zeroed", &zero), ("flipped byte", &flipped)] {
                let out = run_reader(tool, pre, input);
                let err = failed(&out, &format!("{tool} on {what}"));
                assert!(
                    err.contains("bad checksum in superblock") && err.contains("block 0"),
                    "{tool} on {what}: {err}"
                );
            }
        }
    }
    // Our exit codes stay: 66 for an input that is missing or not usable.
    for (_, input, _) in cases {
        let out = run("thin_dump", &[p(input)]);
        assert_eq!(out.status.code(), Some(66), "{}", stderr(&out));
    }
    let out = run("thin_dump", &[p(&zero)]);
    assert_eq!(out.status.code(), Some(65));
}

#[test]
fn binary_metadata_is_never_taken_for_xml() {
    use thinmeta::pdata::io::looks_like_xml;
    let meta = gunzip(&fixture_dir().join("meta.img.gz"));
    for block in meta.chunks(4096) {
        assert!(!looks_like_xml(block));
    }
    assert!(looks_like_xml(b"<superblock uuid=\"\">"));
    assert!(looks_like_xml(b"\xef\xbb\xbf\n  <?xml version=\"1.0\"?>\n"));
    let mut padded = b"<superblock>\n</superblock>\n".to_vec();
    padded.resize(4096, 0);
    assert!(looks_like_xml(&padded), "XML padded with NUL bytes");
    padded[4000] = 1;
    assert!(!looks_like_xml(&padded), "binary after the text");
    assert!(!looks_like_xml(b"< not a tag"));
    assert!(!looks_like_xml(b""));
    assert!(!looks_like_xml(&[0u8; 4096]));
}

#[test]
fn repair_with_nothing_recoverable_says_no_compatible_roots_found() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let zero = zeroed(d, "zero", 4 << 20);
    let out_path = fixture_copy(d);
    let before = std::fs::read(&out_path).unwrap();
    let out = run("thin_repair", &["-i", p(&zero), "-o", p(&out_path)]);
    let err = failed(&out, "thin_repair of zeros");
    assert!(err.contains("no compatible roots found"), "{err}");
    assert_eq!(
        std::fs::read(&out_path).unwrap(),
        before,
        "output untouched"
    );
    let out = run("thin_dump", &["--repair", p(&zero)]);
    let err = failed(&out, "thin_dump --repair of zeros");
    assert!(err.contains("no compatible roots found"), "{err}");
    assert!(out.stdout.is_empty());
    // XML is not repaired either.
    let xml = big_xml(d);
    let out = run("thin_repair", &["-i", p(&xml), "-o", p(&out_path)]);
    let err = failed(&out, "thin_repair of XML");
    assert!(err.contains("This looks like XML."), "{err}");
    assert_eq!(
        std::fs::read(&out_path).unwrap(),
        before,
        "output untouched"
    );
}

#[test]
fn writers_name_bad_outputs_in_the_peers_words() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let meta = fixture_copy(d);
    let xml = xml_dump(d, &meta);
    for tool in ["thin_restore", "thin_repair"] {
        let input = if tool == "thin_restore" { &xml } else { &meta };
        // Too small for the metadata, and too small for one block.
        for len in [4096, 1024] {
            let out_path = zeroed(d, "small-out", len);
            let out = run(tool, &["-i", p(input), "-o", p(&out_path)]);
            let err = failed(&out, &format!("{tool} to {len} bytes"));
            assert!(err.contains("Output file too small"), "{tool}: {err}");
            assert_eq!(out.status.code(), Some(66));
            assert!(std::fs::read(&out_path).unwrap().iter().all(|&b| b == 0));
        }
        let out = run(tool, &["-i", p(input), "-o", p(&d.join("nope"))]);
        let err = failed(&out, &format!("{tool} to a missing file"));
        assert!(err.contains("Couldn't find output file"), "{err}");
        let out = run(tool, &["-i", p(input), "-o", p(d)]);
        let err = failed(&out, &format!("{tool} to a directory"));
        assert!(err.contains("Not a block device or regular file"), "{err}");
        let out_path = zeroed(d, "out", 4 << 20);
        let out = run(tool, &["-i", p(&d.join("nope")), "-o", p(&out_path)]);
        let err = failed(&out, &format!("{tool} from a missing file"));
        assert!(err.contains("Couldn't find input file"), "{err}");
        // An impossible block size, in the peer's words.
        let out = run(
            tool,
            &[
                "-i",
                p(input),
                "-o",
                p(&out_path),
                "--data-block-size",
                "100",
            ],
        );
        assert_eq!(out.status.code(), Some(64));
        assert!(failed(&out, tool).contains("data block size"));
    }

    // A lost superblock and no block size given.
    let restored = zeroed(d, "restored", 4 << 20);
    let out = run("thin_restore", &["-i", p(&xml), "-o", p(&restored)]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    open_rw(&restored).write_all_at(&[0u8; 4096], 0).unwrap();
    let out_path = zeroed(d, "out2", 4 << 20);
    let out = run(
        "thin_repair",
        &[
            "--transaction-id=1",
            "--nr-data-blocks=20480",
            "-i",
            p(&restored),
            "-o",
            p(&out_path),
        ],
    );
    assert!(failed(&out, "no block size").contains("data block size"));
    let out = run(
        "thin_dump",
        &[
            "--repair",
            "--transaction-id=1",
            "--nr-data-blocks=20480",
            p(&restored),
        ],
    );
    assert!(failed(&out, "no block size").contains("data block size"));
}

#[test]
fn thin_delta_names_the_missing_device_in_the_peers_words() {
    let dir = tempfile::tempdir().unwrap();
    let meta = fixture_copy(dir.path());
    let m = p(&meta);
    for (args, phrase) in [
        (vec!["--snap2", "2", m], "--thin1 or --root1 not specified"),
        (vec!["--root2", "9", m], "--thin1 or --root1 not specified"),
        (vec!["--snap1", "1", m], "--thin2 or --root2 not specified"),
        (vec![m], "--thin1 or --root1 not specified"),
    ] {
        let out = run("thin_delta", &args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = failed(&out, "thin_delta");
        assert!(err.contains(phrase), "{args:?}: {err}");
    }
    // No input: clap's wording, as the peer's.
    let out = run("thin_delta", &["--snap1", "1", "--snap2", "2"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("the following required arguments were not provided"));
    // Both of a pair: still refused.
    let out = run(
        "thin_delta",
        &["--thin1", "1", "--root1", "5", "--thin2", "2", m],
    );
    assert_eq!(out.status.code(), Some(64));
    // Both given: works.
    let out = run("thin_delta", &["--snap1", "1", "--snap2", "2", m]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// Run `thinmeta TOOL args` as user nobody (the tests run as root, which
/// may read anything), or as ourselves when we are not root.
fn run_unprivileged(tool: &str, args: &[&str]) -> Option<Output> {
    // SAFETY: getuid has no preconditions.
    let root = unsafe { libc::getuid() } == 0;
    let mut cmd = if root {
        let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
            .into_iter()
            .find(|p| Path::new(p).exists())?;
        let mut c = Command::new(setpriv);
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", bin()]);
        c
    } else {
        Command::new(bin())
    };
    Some(cmd.arg(tool).args(args).output().unwrap())
}

#[test]
fn unreadable_inputs_and_unwritable_outputs_say_permission_denied() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let meta = fixture_copy(d);
    let xml = xml_dump(d, &meta);
    let secret = d.join("secret.img");
    std::fs::copy(&meta, &secret).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    let secret_xml = d.join("secret.xml");
    std::fs::copy(&xml, &secret_xml).unwrap();
    std::fs::set_permissions(&secret_xml, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(&xml, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Writable by anyone, and one that only its owner may write.
    let open_out = zeroed(d, "open-out", 4 << 20);
    std::fs::set_permissions(&open_out, std::fs::Permissions::from_mode(0o666)).unwrap();
    let closed_out = zeroed(d, "closed-out", 4 << 20);
    std::fs::set_permissions(&closed_out, std::fs::Permissions::from_mode(0o444)).unwrap();

    let mut cases: Vec<(&str, Vec<&str>)> = READERS
        .iter()
        .map(|(tool, pre)| {
            let mut a = pre.to_vec();
            a.push(p(&secret));
            (*tool, a)
        })
        .collect();
    cases.push(("thin_repair", vec!["-i", p(&secret), "-o", p(&open_out)]));
    cases.push((
        "thin_restore",
        vec!["-i", p(&secret_xml), "-o", p(&open_out)],
    ));
    cases.push(("thin_restore", vec!["-i", p(&xml), "-o", p(&closed_out)]));
    cases.push(("thin_repair", vec!["-i", p(&meta), "-o", p(&closed_out)]));
    std::fs::set_permissions(&meta, std::fs::Permissions::from_mode(0o644)).unwrap();
    for (tool, args) in &cases {
        let Some(out) = run_unprivileged(tool, args) else {
            eprintln!("note: no setpriv to drop root; Permission denied not tested");
            return;
        };
        let err = failed(&out, &format!("{tool} {args:?}"));
        assert!(err.contains("Permission denied"), "{tool} {args:?}: {err}");
    }
    assert!(
        std::fs::read(&open_out).unwrap().iter().all(|&b| b == 0),
        "nothing written"
    );
}
