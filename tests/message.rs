//! thin_message offline: the kernel's pool messages on a kernel-written
//! pool, each checked by thin_check, by the dumps, and by the space maps.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use thinmeta::pdata::btree::Walker;
use thinmeta::pdata::counts::RefCounts;
use thinmeta::pdata::io::{BlockDevice, OpenMode};
use thinmeta::pdata::space_map::DiskSpaceMap;
use thinmeta::thin::superblock::read_superblock;

const BLOCK: usize = 4096;

fn fixture(dir: &Path) -> PathBuf {
    unpack(&fixture_dir().join("meta.img.gz"), dir, "meta.img")
}

fn msg(img: &Path, words: &str) -> std::process::Output {
    let mut args = vec![img.to_str().unwrap()];
    args.extend(words.split_whitespace());
    run("thin_message", &args)
}

fn ok(img: &Path, words: &str) {
    let out = msg(img, words);
    assert!(
        out.status.success(),
        "{words}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let check = run("thin_check", &[img.to_str().unwrap()]);
    assert!(
        check.status.success(),
        "thin_check after {words}: {}",
        String::from_utf8_lossy(&check.stderr)
    );
}

fn dump(img: &Path, extra: &[&str]) -> String {
    let mut args = extra.to_vec();
    args.push(img.to_str().unwrap());
    let out = run("thin_dump", &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One device's element (its lines) from a dump, or None.
fn device(xml: &str, id: u64) -> Option<String> {
    let head = format!("<device dev_id=\"{id}\" ");
    let start = xml.find(&head)?;
    let end = start + xml[start..].find("</device>")?;
    Some(xml[start..end].to_string())
}

/// The attribute `name` of the first element starting with `head`.
fn attr(xml: &str, head: &str, name: &str) -> u64 {
    let e = &xml[xml.find(head).unwrap()..];
    let e = &e[..e.find('>').unwrap()];
    let v = &e[e.find(&format!(" {name}=\"")).unwrap() + name.len() + 3..];
    v[..v.find('"').unwrap()].parse().unwrap()
}

/// (data counts, metadata counts, blocks of the space maps themselves).
fn space_maps(img: &Path) -> (RefCounts, RefCounts, RefCounts) {
    let dev = BlockDevice::open(img, OpenMode::ReadOnly).unwrap();
    let sb = read_superblock(&dev, 0).unwrap();
    let mut w = Walker::new(&dev).with_ref_counts();
    let (d, e1) = DiskSpaceMap::load_data(&mut w, sb.data_sm());
    let (m, e2) = DiskSpaceMap::load_metadata(&mut w, sb.metadata_sm());
    assert!(e1.is_empty() && e2.is_empty());
    (
        d.to_counts(&dev).unwrap(),
        m.to_counts(&dev).unwrap(),
        w.take_ref_counts().unwrap(),
    )
}

#[test]
fn create_snapshot_delete_follow_the_kernel() {
    let t = tempfile::tempdir().unwrap();
    let img = fixture(t.path());
    let before = dump(&img, &[]);
    let time = attr(&before, "<superblock", "time");
    let trans = attr(&before, "<superblock", "transaction");

    ok(&img, "create_thin 7");
    let x = dump(&img, &[]);
    let d7 = device(&x, 7).unwrap();
    assert!(d7.starts_with(&format!(
        "<device dev_id=\"7\" mapped_blocks=\"0\" transaction=\"{trans}\" creation_time=\"{time}\" snap_time=\"{time}\">"
    )), "{d7}");

    // A snapshot shares the origin's mappings; the pool's time goes up and
    // both are marked snapshotted then.
    ok(&img, "create_snap 8 1");
    let x = dump(&img, &[]);
    assert_eq!(attr(&x, "<superblock", "time"), time + 1);
    let (d1, d8) = (device(&x, 1).unwrap(), device(&x, 8).unwrap());
    let body = |d: &str| d[d.find('>').unwrap()..].to_string();
    assert_eq!(body(&d1), body(&d8));
    assert_eq!(attr(&d8, "<device", "snap_time"), time + 1);
    assert_eq!(attr(&d8, "<device", "creation_time"), time + 1);
    assert_eq!(attr(&d1, "<device", "snap_time"), time + 1);
    assert_eq!(
        attr(&d8, "<device", "mapped_blocks"),
        attr(&d1, "<device", "mapped_blocks")
    );

    // Deleting frees what only that device held: thin_check (run by `ok`)
    // fails on any leaked or miscounted block.
    // While the metadata snapshot holds device 2's tree, its data stays
    // allocated (as in the kernel); once released, the blocks only device 2
    // mapped are free.
    let (data_before, _, _) = space_maps(&img);
    ok(&img, "delete 2");
    let x = dump(&img, &[]);
    assert!(device(&x, 2).is_none());
    let (data_after, _, _) = space_maps(&img);
    assert_eq!(data_after.nr_allocated(), data_before.nr_allocated());
    ok(&img, "release_metadata_snap");
    let (data_released, _, _) = space_maps(&img);
    assert!(data_released.nr_allocated() < data_after.nr_allocated());

    ok(&img, "set_transaction_id 5 6");
    assert_eq!(attr(&dump(&img, &[]), "<superblock", "transaction"), 6);
}

#[test]
fn reserve_then_release_restores_the_space_maps() {
    let t = tempfile::tempdir().unwrap();
    let img = fixture(t.path());
    // The fixture holds a kernel-made metadata snapshot: release it first.
    ok(&img, "release_metadata_snap");
    let live = dump(&img, &[]);

    ok(&img, "reserve_metadata_snap");
    // The snapshot shows what the live metadata showed (the peer prints
    // nr_data_blocks="0" for a snapshot: its superblock copy has no space maps).
    let snap = dump(&img, &["-m"]);
    let nr = attr(&live, "<superblock", "nr_data_blocks");
    assert_eq!(
        snap.replacen(
            "nr_data_blocks=\"0\"",
            &format!("nr_data_blocks=\"{nr}\""),
            1
        ),
        live
    );
    // Writes after the reserve do not change what the snapshot shows.
    ok(&img, "create_snap 9 3");
    ok(&img, "delete 1");
    assert_eq!(dump(&img, &["-m"]), snap);
    // Releasing it frees what only the snapshot held (device 1's tree):
    // thin_check (run by `ok`) fails on any block left counted.
    ok(&img, "release_metadata_snap");
    assert!(!run("thin_dump", &["-m", img.to_str().unwrap()])
        .status
        .success());

    // And a plain reserve + release, with nothing in between, restores
    // every count exactly.
    let img3 = fixture(&t.path().join("y").tap_mkdir());
    ok(&img3, "release_metadata_snap");
    let (d_a, m_a, sm_a) = space_maps(&img3);
    ok(&img3, "reserve_metadata_snap");
    ok(&img3, "release_metadata_snap");
    let (d_b, m_b, sm_b) = space_maps(&img3);
    for b in 0..d_a.nr_blocks() {
        assert_eq!(d_a.get(b), d_b.get(b), "data block {b}");
    }
    for b in 0..m_a.nr_blocks() {
        if sm_a.get(b) == 0 && sm_b.get(b) == 0 {
            assert_eq!(m_a.get(b), m_b.get(b), "metadata block {b}");
        }
    }
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}
impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}

#[test]
fn refused_messages_write_nothing() {
    let t = tempfile::tempdir().unwrap();
    let img = fixture(t.path());
    let before = std::fs::read(&img).unwrap();
    for (words, why) in [
        ("create_thin 1", "already exists"),
        ("create_snap 9 77", "does not exist"),
        ("create_snap 2 1", "already exists"),
        ("delete 77", "does not exist"),
        ("set_transaction_id 4 9", "not 4"),
        ("reserve_metadata_snap", "already exists"),
        ("create_thin 16777216", "24 bits"),
        ("create_thin x", "not a number"),
        ("frobnicate 1", "unknown message"),
        ("create_thin", "usage"),
    ] {
        let out = msg(&img, words);
        assert_one_line_error(&out, words);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(why),
            "{words}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read(&img).unwrap(), before, "{words} wrote");
    }
    // needs_check set: refused.
    {
        use std::os::unix::fs::FileExt;
        let f = open_rw(&img);
        let mut b = vec![0u8; BLOCK];
        f.read_exact_at(&mut b, 0).unwrap();
        thinmeta::thin::superblock::set_flags(&mut b, 1);
        f.write_all_at(&b, 0).unwrap();
    }
    let flagged = std::fs::read(&img).unwrap();
    let out = msg(&img, "create_thin 9");
    assert_one_line_error(&out, "needs_check");
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs_check"));
    assert_eq!(std::fs::read(&img).unwrap(), flagged);
}

#[test]
fn a_message_writes_only_blocks_the_old_metadata_left_free() {
    let t = tempfile::tempdir().unwrap();
    let img = fixture(t.path());
    let before = std::fs::read(&img).unwrap();
    let (_, meta, _) = space_maps(&img);
    ok(&img, "delete 1");
    let after = std::fs::read(&img).unwrap();
    let mut written = 0;
    for b in 1..before.len() / BLOCK {
        if before[b * BLOCK..(b + 1) * BLOCK] != after[b * BLOCK..(b + 1) * BLOCK] {
            written += 1;
            assert_eq!(meta.get(b as u64), 0, "block {b} was in use");
        }
    }
    assert!(written > 0);
    // A crash before the superblock write leaves the old pool.
    let mut crashed = after.clone();
    crashed[..BLOCK].copy_from_slice(&before[..BLOCK]);
    let c = t.path().join("crashed.img");
    std::fs::write(&c, crashed).unwrap();
    assert!(run("thin_check", &[c.to_str().unwrap()]).status.success());
    assert!(device(&dump(&c, &[]), 1).is_some());
}

#[test]
fn damaged_space_maps_are_refused_before_any_write() {
    // The metadata space map says the top-level mapping root is free: a
    // transaction trusting it could hand that block out and overwrite it.
    use std::os::unix::fs::FileExt;
    use thinmeta::pdata::checksum::{seal, BlockKind};
    use thinmeta::pdata::space_map::{bitmap_word_set, ENTRIES_PER_BITMAP};
    let t = tempfile::tempdir().unwrap();
    let img = fixture(t.path());
    let (root, bitmap) = {
        let dev = BlockDevice::open(&img, OpenMode::ReadOnly).unwrap();
        let sb = read_superblock(&dev, 0).unwrap();
        let mut w = Walker::new(&dev);
        let (m, errs) = DiskSpaceMap::load_metadata(&mut w, sb.metadata_sm());
        assert!(errs.is_empty());
        (
            sb.mapping_root,
            m.index[(sb.mapping_root / ENTRIES_PER_BITMAP) as usize].blocknr,
        )
    };
    let f = open_rw(&img);
    let mut b = vec![0u8; BLOCK];
    f.read_exact_at(&mut b, bitmap * BLOCK as u64).unwrap();
    let j = (root % ENTRIES_PER_BITMAP) as usize;
    let off = 16 + 8 * (j / 32);
    let mut word = u64::from_le_bytes(b[off..off + 8].try_into().unwrap());
    bitmap_word_set(&mut word, j % 32, 0);
    b[off..off + 8].copy_from_slice(&word.to_le_bytes());
    seal(&mut b, BlockKind::Bitmap);
    f.write_all_at(&b, bitmap * BLOCK as u64).unwrap();
    let before = std::fs::read(&img).unwrap();
    for words in ["create_thin 9", "delete 1", "release_metadata_snap"] {
        let out = msg(&img, words);
        assert_eq!(out.status.code(), Some(65), "{words}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("thin_check"));
        assert_eq!(std::fs::read(&img).unwrap(), before, "{words} wrote");
    }
}
