//! Bad input: every case gets a one-line error and a non-zero exit (never 2,
//! never a panic), and every single-byte corruption of a superblock, btree
//! node, bitmap and index block is caught.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::*;
use thinmeta::pdata::checksum::{self, BlockKind};
use thinmeta::pdata::io::{BlockDevice, OpenMode};
use thinmeta::pdata::BLOCK_SIZE;
use thinmeta::thin::check::{check, CheckOptions};
use thinmeta::thin::dump::{dump, DumpOptions, XmlWriter};
use thinmeta::thin::superblock::read_superblock;

fn fixture_copy(dir: &Path) -> std::path::PathBuf {
    unpack(&fixture_dir().join("meta.img.gz"), dir, "meta.img")
}

#[test]
fn unusable_inputs_get_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("empty"), b"").unwrap();
    std::fs::write(d.join("one-block"), vec![0u8; BLOCK_SIZE]).unwrap();
    std::fs::write(
        d.join("dump.xml"),
        run(
            "thin_dump",
            &[fixture_dir().join("meta.img.gz").to_str().unwrap()],
        )
        .stdout,
    )
    .unwrap();
    let data = unpack(&fixture_dir().join("data.img.gz"), d, "data.img");
    let cases: Vec<(&str, String)> = vec![
        ("missing file", d.join("nope").display().to_string()),
        ("directory", d.display().to_string()),
        ("empty file", d.join("empty").display().to_string()),
        ("one zero block", d.join("one-block").display().to_string()),
        (
            "XML instead of metadata",
            d.join("dump.xml").display().to_string(),
        ),
        (
            "data device instead of metadata",
            data.display().to_string(),
        ),
    ];
    for (what, path) in &cases {
        for tool in ["thin_check", "thin_dump"] {
            let out = run(tool, &[path]);
            assert_one_line_error(&out, &format!("{tool} on {what}"));
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                err.lines()
                    .filter(|l| !l.starts_with("thin_check: ") || l.contains(path.as_str()))
                    .count(),
                err.lines().count()
            );
            assert!(
                err.contains(path.as_str()),
                "{tool} on {what}: message names the device: {err}"
            );
        }
    }
    let out = run("thin_check", &[&cases[5].1]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("block 0"),
        "names the block"
    );
}

#[test]
fn usage_errors_exit_64_never_2() {
    for args in [vec![], vec!["--hedgehogs-only", "x"], vec!["-m=abc", "x"]] {
        for tool in ["thin_check", "thin_dump"] {
            let out = run(tool, &args);
            assert_eq!(
                out.status.code(),
                Some(64),
                "{tool} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let meta = fixture_copy(dir.path());
    let before = std::fs::read(&meta).unwrap();
    let m = meta.to_str().unwrap();
    let out = run("thin_dump", &[m, "-o", m]);
    assert_eq!(
        out.status.code(),
        Some(64),
        "dumping over the input is refused"
    );
    assert_eq!(std::fs::read(&meta).unwrap(), before, "input untouched");
    let out = run("thin_dump", &["--format", "yaml", "x"]);
    assert_eq!(out.status.code(), Some(64));
}

#[test]
fn version_is_bare_and_dispatch_works_through_symlinks() {
    for tool in ["thin_check", "thin_dump"] {
        for flag in ["-V", "--version"] {
            let out = run(tool, &[flag]);
            assert!(out.status.success());
            let v = String::from_utf8(out.stdout).unwrap();
            let first = v.lines().next().unwrap();
            let parts: Vec<u32> = first.split('.').map(|p| p.parse().unwrap()).collect();
            assert_eq!(parts.len(), 3, "X.Y.Z: {first}");
            assert!(parts[0] >= 1);
            assert!(
                &first.as_bytes()[..5] >= b"0.7.4".as_slice(),
                "wyng compares the first five characters"
            );
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("thin_check");
    std::os::unix::fs::symlink(bin(), &link).unwrap();
    let out = std::process::Command::new(&link)
        .arg(fixture_dir().join("meta.img.gz"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "argv[0] dispatch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("TRANSACTION_ID=5\n"));
    let out = std::process::Command::new(bin()).output().unwrap();
    assert_eq!(out.status.code(), Some(64), "thinmeta without a command");
}

/// Referenced blocks of the fixture, one of each kind.
fn interesting_blocks(dev: &BlockDevice) -> Vec<(&'static str, u64)> {
    let sb = read_superblock(dev, 0).unwrap();
    let mut buf = vec![0u8; BLOCK_SIZE];
    let index = sb.metadata_sm().bitmap_root;
    dev.read_block(index, &mut buf).unwrap();
    let meta_bitmap = u64::from_le_bytes(buf[16..24].try_into().unwrap());
    let data_index_root = sb.data_sm().bitmap_root;
    dev.read_block(data_index_root, &mut buf).unwrap();
    let max = u32::from_le_bytes(buf[20..24].try_into().unwrap()) as usize;
    let data_bitmap = u64::from_le_bytes(buf[32 + 8 * max..40 + 8 * max].try_into().unwrap());
    vec![
        ("superblock", 0),
        ("metadata snapshot superblock", sb.metadata_snap),
        ("device details root", sb.details_root),
        ("mapping tree top level", sb.mapping_root),
        ("metadata space map index", index),
        ("metadata space map bitmap", meta_bitmap),
        ("data space map index tree", data_index_root),
        ("data space map bitmap", data_bitmap),
    ]
}

#[test]
fn every_single_byte_corruption_fails_the_check_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture_copy(dir.path());
    let file = open_rw(&path);
    let blocks = {
        let dev = BlockDevice::open(&path, OpenMode::ReadOnly).unwrap();
        interesting_blocks(&dev)
    };
    for (what, b) in blocks {
        let mut orig = vec![0u8; BLOCK_SIZE];
        file.read_exact_at(&mut orig, b * BLOCK_SIZE as u64)
            .unwrap();
        let kind = checksum::identify(&orig)
            .unwrap_or_else(|| panic!("{what} (block {b}) has no valid checksum"));
        assert!(matches!(
            kind,
            BlockKind::ThinSuperblock
                | BlockKind::BTreeNode
                | BlockKind::Bitmap
                | BlockKind::MetadataIndex
        ));
        for off in 0..BLOCK_SIZE {
            let pos = b * BLOCK_SIZE as u64 + off as u64;
            file.write_all_at(&[orig[off] ^ 0xa5], pos).unwrap();
            let dev = BlockDevice::open(&path, OpenMode::ReadOnly).unwrap();
            let rep = check(&dev, &CheckOptions::default(), &mut |_, _| {});
            assert!(
                !rep.passed(false),
                "{what} (block {b}) byte {off} corrupted: check passed"
            );
            let mut sink = XmlWriter::new(std::io::sink());
            let dumped = dump(&dev, &DumpOptions::default(), &mut sink, &mut |_, _| {});
            if matches!(
                what,
                "superblock" | "device details root" | "mapping tree top level"
            ) {
                assert!(dumped.is_err(), "{what} byte {off}: dump succeeded");
            }
            file.write_all_at(&orig[off..off + 1], pos).unwrap();
        }
    }
    let dev = BlockDevice::open(&path, OpenMode::ReadOnly).unwrap();
    assert!(
        check(&dev, &CheckOptions::default(), &mut |_, _| {}).passed(false),
        "restored image passes"
    );
}

/// Write a btree node block at `loc` (kernel layout) and seal its checksum.
fn write_node(file: &std::fs::File, loc: u64, leaf: bool, keys: &[u64], values: &[u64]) {
    let mut b = vec![0u8; BLOCK_SIZE];
    let max = 252usize;
    b[4..8].copy_from_slice(&(if leaf { 2u32 } else { 1 }).to_le_bytes());
    b[8..16].copy_from_slice(&loc.to_le_bytes());
    b[16..20].copy_from_slice(&(keys.len() as u32).to_le_bytes());
    b[20..24].copy_from_slice(&(max as u32).to_le_bytes());
    b[24..28].copy_from_slice(&8u32.to_le_bytes());
    for (i, (k, v)) in keys.iter().zip(values).enumerate() {
        b[32 + 8 * i..40 + 8 * i].copy_from_slice(&k.to_le_bytes());
        b[32 + 8 * max + 8 * i..40 + 8 * max + 8 * i].copy_from_slice(&v.to_le_bytes());
    }
    checksum::seal(&mut b, BlockKind::BTreeNode);
    file.write_all_at(&b, loc * BLOCK_SIZE as u64).unwrap();
}

/// Point device 1's mapping tree (in the top-level leaf) at `new_root`.
fn repoint_device_1(file: &std::fs::File, top_level: u64, new_root: u64) {
    let mut b = vec![0u8; BLOCK_SIZE];
    file.read_exact_at(&mut b, top_level * BLOCK_SIZE as u64)
        .unwrap();
    let nr = u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize;
    let i = (0..nr)
        .find(|&i| u64::from_le_bytes(b[32 + 8 * i..40 + 8 * i].try_into().unwrap()) == 1)
        .unwrap();
    let off = 32 + 8 * 252 + 8 * i;
    b[off..off + 8].copy_from_slice(&new_root.to_le_bytes());
    checksum::seal(&mut b, BlockKind::BTreeNode);
    file.write_all_at(&b, top_level * BLOCK_SIZE as u64)
        .unwrap();
}

#[test]
fn loops_and_pointers_past_the_device_are_damage() {
    let dir = tempfile::tempdir().unwrap();
    let path = fixture_copy(dir.path());
    let file = open_rw(&path);
    let top = {
        let dev = BlockDevice::open(&path, OpenMode::ReadOnly).unwrap();
        read_superblock(&dev, 0).unwrap().mapping_root
    };
    let p = path.to_str().unwrap();

    // 1000 -> 1001 -> 1000: a node pointing at its ancestor.
    write_node(&file, 1000, false, &[0], &[1001]);
    write_node(&file, 1001, false, &[0], &[1000]);
    repoint_device_1(&file, top, 1000);
    for tool in ["thin_check", "thin_dump"] {
        let out = run(tool, &[p]);
        assert_one_line_error(&out, &format!("{tool} on a looping tree"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("loop") || err.contains("ancestor"),
            "{tool}: {err}"
        );
        assert!(err.contains("device 1"), "{tool} names the device: {err}");
    }

    // A child pointer far beyond the 1024-block device.
    write_node(&file, 1000, false, &[0], &[5_000_000]);
    for tool in ["thin_check", "thin_dump"] {
        let out = run(tool, &[p]);
        assert_one_line_error(&out, &format!("{tool} on a pointer past the device"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("5000000") && err.contains("beyond"),
            "{tool}: {err}"
        );
    }

    // A leaf whose keys are out of order (resealed, so only the structure is wrong).
    write_node(&file, 1000, true, &[7, 3], &[1 << 24, 2 << 24]);
    let out = run("thin_check", &[p]);
    assert_one_line_error(&out, "thin_check on unordered keys");
    assert!(String::from_utf8_lossy(&out.stderr).contains("out of order"));
}

#[test]
fn leaked_blocks_are_non_fatal_and_reported() {
    // Drop one mapping from a device's tree (and from its mapped_blocks) but
    // not from the space map: its data block leaks, as after a crash.
    // Device 1's live leaf is block 53 and is not shared (see the fixture
    // README); virtual block 120 -> data block 42 was written after the
    // metadata snapshot, so nothing else references data block 42.
    let dir = tempfile::tempdir().unwrap();
    let path = fixture_copy(dir.path());
    let file = open_rw(&path);
    let (leaf, details) = {
        let dev = BlockDevice::open(&path, OpenMode::ReadOnly).unwrap();
        let sb = read_superblock(&dev, 0).unwrap();
        (53u64, sb.details_root)
    };
    let mut b = vec![0u8; BLOCK_SIZE];
    file.read_exact_at(&mut b, leaf * BLOCK_SIZE as u64)
        .unwrap();
    let nr = u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize;
    let entry = |i: usize| {
        let k = u64::from_le_bytes(b[32 + 8 * i..40 + 8 * i].try_into().unwrap());
        let v = u64::from_le_bytes(
            b[32 + 8 * 252 + 8 * i..40 + 8 * 252 + 8 * i]
                .try_into()
                .unwrap(),
        );
        (k, v)
    };
    let kept: Vec<(u64, u64)> = (0..nr).map(entry).filter(|&(k, _)| k != 120).collect();
    assert_eq!(kept.len(), nr - 1);
    assert_eq!(
        (0..nr).map(entry).find(|&(k, _)| k == 120).unwrap().1 >> 24,
        42
    );
    let keys: Vec<u64> = kept.iter().map(|e| e.0).collect();
    let values: Vec<u64> = kept.iter().map(|e| e.1).collect();
    write_node(&file, leaf, true, &keys, &values);

    // Device details leaf: 24-byte values after 126 keys; mapped_blocks first.
    file.read_exact_at(&mut b, details * BLOCK_SIZE as u64)
        .unwrap();
    let nr = u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize;
    let i = (0..nr)
        .find(|&i| u64::from_le_bytes(b[32 + 8 * i..40 + 8 * i].try_into().unwrap()) == 1)
        .unwrap();
    let off = 32 + 8 * 126 + 24 * i;
    let mapped = u64::from_le_bytes(b[off..off + 8].try_into().unwrap());
    b[off..off + 8].copy_from_slice(&(mapped - 1).to_le_bytes());
    checksum::seal(&mut b, BlockKind::BTreeNode);
    file.write_all_at(&b, details * BLOCK_SIZE as u64).unwrap();

    let p = path.to_str().unwrap();
    let out = run("thin_check", &[p]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(
        err.contains("1 data blocks have leaked") && err.contains("42 (count 1)"),
        "{err}"
    );
    assert!(!err.contains("wrong reference counts"), "{err}");
    let out = run("thin_check", &["--ignore-non-fatal-errors", p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // --auto-repair frees the leaked block: new space maps are written where
    // the old metadata has nothing (so a crash before the superblock write
    // leaves it whole), then the superblock.
    let before = std::fs::read(&path).unwrap();
    let dumps = |p: &str| {
        (
            run("thin_dump", &[p]).stdout,
            run("thin_dump", &["-m", p]).stdout,
        )
    };
    let dumped = dumps(p);
    let old_in_use = {
        let dev = BlockDevice::open(&path, OpenMode::ReadOnly).unwrap();
        let sb = read_superblock(&dev, 0).unwrap();
        let mut w = thinmeta::pdata::btree::Walker::new(&dev);
        let (sm, _) =
            thinmeta::pdata::space_map::DiskSpaceMap::load_metadata(&mut w, sb.metadata_sm());
        sm.in_use(&dev).unwrap()
    };
    let out = run("thin_check", &["--auto-repair", p]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("1 leaked data"), "{err}");
    let out = run("thin_check", &[p]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dumps(p), dumped, "mappings unchanged");
    let after = std::fs::read(&path).unwrap();
    for blk in 1..before.len() / BLOCK_SIZE {
        let r = blk * BLOCK_SIZE..(blk + 1) * BLOCK_SIZE;
        if before[r.clone()] != after[r] {
            assert!(
                !old_in_use.contains(blk),
                "auto-repair overwrote block {blk} in use"
            );
        }
    }
}

#[test]
fn an_impossible_space_map_size_is_damage_not_an_allocation() {
    // A resealed superblock (a writer bug, not bit rot) claiming 2^50 data blocks.
    let dir = tempfile::tempdir().unwrap();
    let path = fixture_copy(dir.path());
    let file = open_rw(&path);
    let mut b = vec![0u8; BLOCK_SIZE];
    file.read_exact_at(&mut b, 0).unwrap();
    b[64..72].copy_from_slice(&(1u64 << 50).to_le_bytes()); // data_sm_root.nr_blocks
    checksum::seal(&mut b, BlockKind::ThinSuperblock);
    file.write_all_at(&b, 0).unwrap();
    let out = run("thin_check", &[path.to_str().unwrap()]);
    assert_one_line_error(&out, "thin_check on a 2^50-block data space map");
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot fit"));
}
