//! thin_delta: the real binary on the kernel-written fixture (checked against
//! a comparison computed independently from thin_dump's XML), its options
//! and errors, and the sharing awareness of the walk (nodes read).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use thinmeta::pdata::io::{BlockDevice, OpenMode};
use thinmeta::thin::delta::{delta, DeltaOptions, DeltaStats, Target, XmlDeltaWriter};

fn meta() -> String {
    fixture_dir()
        .join("meta.img.gz")
        .to_string_lossy()
        .into_owned()
}

fn ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{tool} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn attr(line: &str, name: &str) -> Option<u64> {
    let pat = format!(" {name}=\"");
    let i = line.find(&pat)? + pat.len();
    let j = line[i..].find('"')?;
    line[i..i + j].parse().ok()
}

fn attr_str<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    let pat = format!(" {name}=\"");
    let i = line.find(&pat)? + pat.len();
    let j = line[i..].find('"')?;
    Some(&line[i..i + j])
}

/// Every device's mappings (virtual block -> data block) from a thin_dump
/// XML, `<ref>`s replaced by their `<def>`s.
fn mappings(xml: &str) -> BTreeMap<u64, BTreeMap<u64, u64>> {
    let mut defs: HashMap<String, Vec<(u64, u64)>> = HashMap::new();
    let mut devs = BTreeMap::new();
    let mut def: Option<(String, Vec<(u64, u64)>)> = None;
    let mut dev: Option<(u64, BTreeMap<u64, u64>)> = None;
    for line in xml.lines().map(str::trim) {
        let mut add = |v: u64, d: u64| match (&mut def, &mut dev) {
            (Some((_, m)), _) => m.push((v, d)),
            (None, Some((_, m))) => {
                m.insert(v, d);
            }
            _ => panic!("mapping outside a def or device: {line}"),
        };
        if line.starts_with("<def ") {
            def = Some((attr_str(line, "name").unwrap().to_string(), Vec::new()));
        } else if line == "</def>" {
            let (n, m) = def.take().unwrap();
            defs.insert(n, m);
        } else if line.starts_with("<device ") {
            dev = Some((attr(line, "dev_id").unwrap(), BTreeMap::new()));
        } else if line == "</device>" {
            let (id, m) = dev.take().unwrap();
            devs.insert(id, m);
        } else if line.starts_with("<ref ") {
            for &(v, d) in &defs[attr_str(line, "name").unwrap()] {
                add(v, d);
            }
        } else if line.starts_with("<single_mapping ") {
            add(
                attr(line, "origin_block").unwrap(),
                attr(line, "data_block").unwrap(),
            );
        } else if line.starts_with("<range_mapping ") {
            let (v, d, n) = (
                attr(line, "origin_begin").unwrap(),
                attr(line, "data_begin").unwrap(),
                attr(line, "length").unwrap(),
            );
            for i in 0..n {
                add(v + i, d + i);
            }
        }
    }
    devs
}

/// (kind, begin, length, data of the first block on each side), computed
/// block by block: the maximal runs of consecutive virtual blocks of one kind.
type Expected = Vec<(&'static str, u64, u64, u64, u64)>;

fn compare(a: &BTreeMap<u64, u64>, b: &BTreeMap<u64, u64>) -> Expected {
    let mut keys: Vec<u64> = a.keys().chain(b.keys()).copied().collect();
    keys.sort_unstable();
    keys.dedup();
    let mut out: Expected = Vec::new();
    for k in keys {
        let (kind, l, r) = match (a.get(&k), b.get(&k)) {
            (Some(&l), Some(&r)) if l == r => ("same", l, r),
            (Some(&l), Some(&r)) => ("different", l, r),
            (Some(&l), None) => ("left_only", l, 0),
            (None, Some(&r)) => ("right_only", 0, r),
            (None, None) => unreachable!(),
        };
        match out.last_mut() {
            Some(last) if last.0 == kind && last.1 + last.2 == k => last.2 += 1,
            _ => out.push((kind, k, 1, l, r)),
        }
    }
    out
}

/// The lines of the diff's entries as the peer prints them.
fn expected_lines(e: &Expected, verbose: bool) -> Vec<String> {
    let mut lines = Vec::new();
    let mut group: Option<&str> = None;
    for &(kind, begin, len, l, r) in e {
        if !verbose {
            lines.push(format!("    <{kind} begin=\"{begin}\" length=\"{len}\"/>"));
            continue;
        }
        if group != Some(kind) {
            if let Some(g) = group {
                lines.push(format!("    </{g}>"));
            }
            lines.push(format!("    <{kind}>"));
            group = Some(kind);
        }
        lines.push(match kind {
            "different" => format!(
                "      <range begin=\"{begin}\" left_data_begin=\"{l}\" right_data_begin=\"{r}\" length=\"{len}\"/>"
            ),
            "right_only" => {
                format!("      <range begin=\"{begin}\" data_begin=\"{r}\" length=\"{len}\"/>")
            }
            _ => format!("      <range begin=\"{begin}\" data_begin=\"{l}\" length=\"{len}\"/>"),
        });
    }
    if let Some(g) = group {
        lines.push(format!("    </{g}>"));
    }
    lines
}

/// The entry lines of a thin_delta XML output (between `<diff>` and `</diff>`),
/// checking the frame around them.
fn entry_lines(xml: &str, left: u64, right: u64) -> Vec<String> {
    assert!(!xml.ends_with('\n'), "no newline after </superblock>");
    let lines: Vec<&str> = xml.lines().collect();
    assert!(
        lines[0].starts_with("<superblock uuid=\"\" time=\""),
        "{}",
        lines[0]
    );
    assert_eq!(
        lines[1],
        format!("  <diff left=\"{left}\" right=\"{right}\">")
    );
    assert_eq!(lines[lines.len() - 2], "  </diff>");
    assert_eq!(lines[lines.len() - 1], "</superblock>");
    lines[2..lines.len() - 2]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// thin_delta of `left` and `right` must equal what the dump says, plain and verbose.
fn check_against_dump(extra: &[&str], left: u64, right: u64) -> Expected {
    let mut dump_args = extra.to_vec();
    let m = meta();
    dump_args.push(&m);
    let devs = mappings(&ok("thin_dump", &dump_args));
    let want = compare(&devs[&left], &devs[&right]);
    for verbose in [false, true] {
        let (l, r) = (left.to_string(), right.to_string());
        let mut args = extra.to_vec();
        if verbose {
            args.push("--verbose");
        }
        args.extend(["--thin1", &l, "--thin2", &r, &m]);
        let got = entry_lines(&ok("thin_delta", &args), left, right);
        assert_eq!(
            got,
            expected_lines(&want, verbose),
            "thin_delta {args:?} differs from the comparison of the dumps"
        );
    }
    want
}

#[test]
fn a_snapshot_sharing_its_leaf_is_all_same() {
    let want = check_against_dump(&[], 3, 4);
    assert!(!want.is_empty());
    assert!(want.iter().all(|e| e.0 == "same"), "{want:?}");
    // The fixture's device 3: blocks 0, 10, 30-31, 63.
    let runs: Vec<(u64, u64)> = want.iter().map(|e| (e.1, e.2)).collect();
    assert_eq!(runs, vec![(0, 1), (10, 1), (30, 2), (63, 1)]);
}

#[test]
fn origin_and_snapshot_match_the_dumps() {
    let want = check_against_dump(&[], 1, 2);
    for kind in ["same", "different", "left_only", "right_only"] {
        assert!(want.iter().any(|e| e.0 == kind), "no {kind} in {want:?}");
    }
    // And the other way round: left and right swap.
    let back = check_against_dump(&[], 2, 1);
    assert_eq!(want.len(), back.len());
}

#[test]
fn the_metadata_snapshot_is_read_with_m() {
    let live = check_against_dump(&[], 1, 2);
    let snap = check_against_dump(&["-m"], 1, 2);
    assert_ne!(live, snap, "dev 1 was written after the metadata snapshot");
    // The held snapshot is at block 39; its superblock copy has no space maps.
    let out = ok(
        "thin_delta",
        &["-m=39", "--thin1", "1", "--thin2", "2", &meta()],
    );
    assert!(out.starts_with(
        "<superblock uuid=\"\" time=\"2\" transaction=\"5\" data_block_size=\"128\" nr_data_blocks=\"0\">"
    ));
    assert_eq!(
        out,
        ok(
            "thin_delta",
            &["-m", "--thin1", "1", "--thin2", "2", &meta()]
        )
    );
}

#[test]
fn roots_can_be_given_directly() {
    // Current roots (tests/data/kernel-small/README.md): 1:53 2:34.
    let by_id = ok("thin_delta", &["--thin1", "1", "--thin2", "2", &meta()]);
    let by_root = ok("thin_delta", &["--root1", "53", "--root2", "34", &meta()]);
    assert_eq!(
        by_root,
        by_id.replace(
            "<diff left=\"1\" right=\"2\">",
            "<diff left_root=\"53\" right_root=\"34\">"
        )
    );
    let mixed = ok("thin_delta", &["--snap1", "1", "--root2", "34", &meta()]);
    assert!(mixed.contains("<diff left=\"1\" right_root=\"34\">"));
}

#[test]
fn a_missing_device_is_named() {
    for (args, names) in [
        (vec!["--thin1", "1", "--thin2", "9"], vec!["9 (--thin2)"]),
        (vec!["--thin1", "7", "--thin2", "2"], vec!["7 (--thin1)"]),
        (
            vec!["--thin1", "7", "--thin2", "9"],
            vec!["7 (--thin1)", "9 (--thin2)"],
        ),
        (
            vec!["--thin1", "8", "--thin2", "8"],
            vec!["8 (--thin1 and --thin2)"],
        ),
        (
            vec!["-m", "--thin1", "1", "--thin2", "5"],
            vec!["5 (--thin2)"],
        ),
    ] {
        let mut a = args.clone();
        let m = meta();
        a.push(&m);
        let out = run("thin_delta", &a);
        assert_one_line_error(&out, &format!("thin_delta {a:?}"));
        assert!(out.stdout.is_empty());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        for n in names {
            assert!(err.contains(n), "{err} does not name {n}");
        }
        assert!(err.contains("its devices: 1, 2, 3, 4"), "{err}");
        assert_eq!(out.status.code(), Some(66), "{err}");
    }
}

#[test]
fn a_device_against_itself_is_all_same_with_a_note() {
    let m = meta();
    let out = run("thin_delta", &["--thin1", "1", "--thin2", "1", &m]);
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("both sides are device 1"), "{err}");
    let xml = String::from_utf8(out.stdout).unwrap();
    let lines = entry_lines(&xml, 1, 1);
    let devs = mappings(&ok("thin_dump", &[&m]));
    assert_eq!(lines, expected_lines(&compare(&devs[&1], &devs[&1]), false));
    assert!(lines.iter().all(|l| l.starts_with("    <same ")));
    let quiet = run("thin_delta", &["-q", "--thin1", "1", "--thin2", "1", &m]);
    assert!(quiet.stderr.is_empty());
    assert_eq!(quiet.stdout, xml.as_bytes());
}

#[test]
fn json_has_the_same_content() {
    let m = meta();
    for verbose in [false, true] {
        let mut args = vec!["-f", "json", "--thin1", "1", "--thin2", "2", &m];
        if verbose {
            args.insert(0, "--verbose");
        }
        let text = ok("thin_delta", &args);
        let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
        assert_eq!(v["superblock"]["transaction"], 5);
        assert_eq!(v["superblock"]["nr_data_blocks"], 256);
        assert_eq!(v["diff"]["left"], 1);
        assert_eq!(v["diff"]["right"], 2);
        let devs = mappings(&ok("thin_dump", &[&m]));
        let want = compare(&devs[&1], &devs[&2]);
        let entries = v["diff"]["entries"].as_array().unwrap();
        assert_eq!(entries.len(), want.len());
        for (e, w) in entries.iter().zip(&want) {
            assert_eq!(e["kind"], w.0);
            assert_eq!(e["begin"], w.1);
            assert_eq!(e["length"], w.2);
            if verbose {
                match w.0 {
                    "different" => {
                        assert_eq!(e["left_data_begin"], w.3);
                        assert_eq!(e["right_data_begin"], w.4);
                    }
                    "right_only" => assert_eq!(e["data_begin"], w.4),
                    _ => assert_eq!(e["data_begin"], w.3),
                }
            } else {
                assert!(e.get("data_begin").is_none());
            }
        }
    }
}

#[test]
fn changes_only_leaves_out_what_is_the_same() {
    let m = meta();
    for verbose in [false, true] {
        let mut args = vec!["--thin1", "1", "--thin2", "2", &m];
        if verbose {
            args.insert(0, "--verbose");
        }
        let full = ok("thin_delta", &args);
        args.insert(0, "--changes-only");
        let changes = ok("thin_delta", &args);
        // The full output without its <same> elements (and, verbose, groups).
        let mut want = Vec::new();
        let mut in_same = false;
        for l in full.lines() {
            match l.trim() {
                "<same>" => in_same = true,
                "</same>" => in_same = false,
                t if in_same || t.starts_with("<same ") => {}
                _ => want.push(l),
            }
        }
        assert_eq!(changes, want.join("\n"));
        assert!(!changes.contains("same"));
    }
    // All the same: nothing but the frame.
    let none = ok(
        "thin_delta",
        &["--changes-only", "--thin1", "3", "--thin2", "4", &m],
    );
    assert_eq!(entry_lines(&none, 3, 4), Vec::<String>::new());
}

#[test]
fn bad_arguments_are_usage_errors() {
    let m = meta();
    for args in [
        vec!["--thin1", "1", &m],
        vec!["--thin2", "1", &m],
        vec!["--thin1", "1", "--root1", "53", "--thin2", "2", &m],
        vec!["--thin1", "x", "--thin2", "2", &m],
        vec!["-f", "yaml", "--thin1", "1", "--thin2", "2", &m],
        vec!["--thin1", "1", "--thin2", "2"],
        vec!["--thin1", "1", "--thin2", "2", "--hedgehogs-only", &m],
    ] {
        let out = run("thin_delta", &args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        assert!(out.stdout.is_empty());
    }
    let v = run("thin_delta", &["-V"]);
    assert_eq!(v.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&v.stdout).trim(), "1.0.0");
}

#[test]
fn a_damaged_node_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let img = unpack(&fixture_dir().join("meta.img.gz"), dir.path(), "meta.img");
    // Block 53: the (leaf) root of device 1's mapping tree.
    open_rw(&img)
        .write_all_at(&[0xff; 8], 53 * 4096 + 64)
        .unwrap();
    let p = img.to_str().unwrap();
    let out = run("thin_delta", &["--thin1", "1", "--thin2", "2", p]);
    assert_one_line_error(&out, "damaged root");
    assert!(out.stdout.is_empty(), "no partial output");
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("block 53"), "{err}");
    assert!(err.contains("device 1"), "{err}");
    // Devices that do not use the block are unaffected.
    ok("thin_delta", &["--thin1", "3", "--thin2", "4", p]);
    // A root that is not a mapping-tree node at all (the superblock).
    let out = run("thin_delta", &["--root1", "0", "--thin2", "2", p]);
    assert_one_line_error(&out, "superblock as a root");
    assert!(String::from_utf8_lossy(&out.stderr).contains("block 0"));
    let out = run("thin_delta", &["--root1", "999999", "--thin2", "2", p]);
    assert_one_line_error(&out, "root beyond the device");
}

//------------------------------------------------------------------------------
// Sharing awareness

/// A generated pool: one origin of `segments` leaves and one snapshot of
/// it, then `writes` write runs to the origin (each copies one or two leaves).
fn generated(dir: &Path, segments: u32, writes: f64) -> PathBuf {
    let img = dir.join("gen.bin");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let seg = segments.to_string();
    let w = writes.to_string();
    ok(
        "thin_generate_metadata",
        &[
            "-q",
            "-o",
            img.to_str().unwrap(),
            "--origins",
            "1",
            "--snaps",
            "1",
            "--segments",
            &seg,
            "--writes",
            &w,
            "--hole-writes",
            "0",
            "--partial",
            "0.3",
        ],
    );
    img
}

fn lib_delta(img: &Path, left: u64, right: u64, changes_only: bool) -> (String, DeltaStats) {
    let dev = BlockDevice::open(img, OpenMode::ReadOnly).unwrap();
    let opts = DeltaOptions {
        metadata_snap: None,
        left: Target::Device(left),
        right: Target::Device(right),
        changes_only,
    };
    let mut w = XmlDeltaWriter::new(Vec::new(), false, changes_only);
    let stats = delta(&dev, &opts, &mut w).unwrap();
    (String::from_utf8(w.into_inner()).unwrap(), stats)
}

#[test]
fn shared_subtrees_are_not_compared() {
    let dir = tempfile::tempdir().unwrap();
    // 3000 segments: ~2500 leaves a tree. One write run: the origin's
    // tree shares all but one or two leaves with the snapshot's.
    let img = generated(dir.path(), 3000, 1.0 / 3000.0);
    let p = img.to_str().unwrap();

    // A whole tree, for scale: a device against itself lists every node once.
    let (_, whole) = lib_delta(&img, 1, 1, false);
    let tree_nodes = whole.nodes_read;
    assert!(tree_nodes > 2000, "{whole:?}");

    // Changes only: shared leaves are skipped unread; what is read is the
    // internal nodes of both trees (not shared by this generator) and the
    // changed leaves.
    let (changes, stats) = lib_delta(&img, 1, 2, true);
    eprintln!("changes only: {stats:?}, a tree has {tree_nodes} nodes");
    assert!(
        stats.leaves_compared >= 2 && stats.leaves_compared <= 8,
        "{stats:?}"
    );
    assert!(
        stats.shared_subtrees as f64 > 0.95 * tree_nodes as f64,
        "{stats:?}"
    );
    assert_eq!(stats.shared_nodes_read, 0);
    assert!(stats.nodes_read * 50 < tree_nodes, "{stats:?}");
    assert!(changes.contains("<different ") || changes.contains("_only "));

    // Full output: shared leaves are read once (to list their mappings as
    // <same>), never compared: about one tree, not two.
    let (full, stats) = lib_delta(&img, 1, 2, false);
    eprintln!("full: {stats:?}");
    assert!(stats.leaves_compared <= 8, "{stats:?}");
    assert!(stats.nodes_read < tree_nodes + tree_nodes / 20, "{stats:?}");
    let without_same: Vec<&str> = full
        .lines()
        .filter(|l| !l.starts_with("    <same "))
        .collect();
    assert_eq!(changes, without_same.join("\n"));

    // And the result is right: the comparison of the two dumps.
    let devs = mappings(&ok("thin_dump", &[p]));
    let out = ok("thin_delta", &["--thin1", "1", "--thin2", "2", p]);
    assert_eq!(out, full);
    assert_eq!(
        entry_lines(&out, 1, 2),
        expected_lines(&compare(&devs[&1], &devs[&2]), false)
    );
}

#[test]
fn unrelated_trees_are_compared_in_full() {
    let dir = tempfile::tempdir().unwrap();
    // Many writes: most leaves differ; verbose output checked too.
    let img = generated(dir.path(), 300, 2.0);
    let p = img.to_str().unwrap();
    let devs = mappings(&ok("thin_dump", &[p]));
    let want = compare(&devs[&1], &devs[&2]);
    for verbose in [false, true] {
        let mut args = vec!["--thin1", "1", "--thin2", "2", p];
        if verbose {
            args.insert(0, "--verbose");
        }
        let out = ok("thin_delta", &args);
        assert_eq!(entry_lines(&out, 1, 2), expected_lines(&want, verbose));
    }
    let (_, stats) = lib_delta(&img, 2, 1, true);
    assert!(stats.leaves_compared > 100, "{stats:?}");
}
