//! thin_restore and thin_repair through the real binary: round trips,
//! crash safety of the write order, bad XML, too-small outputs, and repair of
//! damaged kernel-written metadata.

mod common;

use std::path::{Path, PathBuf};

use common::*;

const BLOCK: usize = 4096;

fn dump(img: &Path) -> String {
    let out = run("thin_dump", &[img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "dump {}: {}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A dump with the names of `<def>`s blanked (they are block numbers).
fn unnamed(xml: &str) -> String {
    xml.lines()
        .map(|l| match l.find("name=\"") {
            Some(i) if l.trim_start().starts_with("<def") || l.trim_start().starts_with("<ref") => {
                let end = i + 6 + l[i + 6..].find('"').unwrap();
                format!("{}{}", &l[..i + 6], &l[end..])
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn check_ok(img: &Path) {
    let out = run("thin_check", &[img.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "thin_check {}: {}",
        img.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn blank(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
    p
}

fn kernel_small(dir: &Path) -> PathBuf {
    unpack(&fixture_dir().join("meta.img.gz"), dir, "meta.img")
}

fn restore(xml: &Path, out: &Path) -> std::process::Output {
    run(
        "thin_restore",
        &["-i", xml.to_str().unwrap(), "-o", out.to_str().unwrap()],
    )
}

#[test]
fn dump_restore_dump_is_identical_and_checks() {
    let t = tempfile::tempdir().unwrap();
    let mut images = vec![fixture_dir().join("meta.img.gz")];
    if let Some(td) = shared_testdata() {
        // Every image under ../shared/testdata that holds readable metadata.
        for e in std::fs::read_dir(td.join("peer")).unwrap() {
            let d = e.unwrap().path();
            let name = d.file_name().unwrap().to_string_lossy().to_string();
            images.push(d.join("repaired.bin.gz"));
            images.push(d.join(format!("{name}.bin.gz")));
        }
        for s in ["thin-held", "thin-released", "thin-crash", "ext-origin"] {
            images.push(td.join("kernel").join(s).join("meta.img.gz"));
        }
        images.push(td.join("kernel/lvm/tmeta_copy.img.gz"));
        images.push(td.join("perf/small.bin.gz"));
        images.push(td.join("perf/medium.bin.gz"));
    }
    let mut n = 0;
    for img in images {
        let out = run("thin_dump", &[img.to_str().unwrap()]);
        if !out.status.success() && img.to_string_lossy().contains("corrupted_tmeta") {
            continue; // its live metadata is damaged (thin_repair's case)
        }
        n += 1;
        let a = dump(&img);
        let xml = t.path().join("a.xml");
        std::fs::write(&xml, &a).unwrap();
        let size = gunzip(&img).len() as u64;
        let out = blank(t.path(), "restored.img", size);
        let r = restore(&xml, &out);
        assert!(
            r.status.success(),
            "{}: {}",
            img.display(),
            String::from_utf8_lossy(&r.stderr)
        );
        assert_eq!(unnamed(&dump(&out)), unnamed(&a), "{}", img.display());
        check_ok(&out);
    }
    if shared_testdata().is_some() {
        assert!(n >= 20, "only {n} images");
    }
}

#[test]
fn restore_keeps_shared_leaves_shared() {
    // Devices 3 and 4 of the fixture share one mapping leaf: the restored
    // pool must still use one leaf for both (one <def>, two <ref>s).
    let t = tempfile::tempdir().unwrap();
    let a = dump(&fixture_dir().join("meta.img.gz"));
    assert_eq!(a.matches("<ref ").count(), 2);
    let xml = t.path().join("a.xml");
    std::fs::write(&xml, &a).unwrap();
    let out = blank(t.path(), "r.img", 4 << 20);
    assert!(restore(&xml, &out).status.success());
    let b = dump(&out);
    assert_eq!(b.matches("<def ").count(), 1);
    assert_eq!(b.matches("<ref ").count(), 2);
}

/// Blocks the metadata on `img` uses, from its metadata space map (via the
/// library, as the kernel would allocate around them).
fn in_use(img: &Path) -> fixedbitset::FixedBitSet {
    use thinmeta::pdata::btree::Walker;
    use thinmeta::pdata::io::{BlockDevice, OpenMode};
    use thinmeta::pdata::space_map::DiskSpaceMap;
    let dev = BlockDevice::open(img, OpenMode::ReadOnly).unwrap();
    let sb = thinmeta::thin::superblock::read_superblock(&dev, 0).unwrap();
    let mut w = Walker::new(&dev);
    let (sm, errs) = DiskSpaceMap::load_metadata(&mut w, sb.metadata_sm());
    assert!(errs.is_empty());
    sm.in_use(&dev).unwrap()
}

#[test]
fn restoring_over_valid_metadata_survives_a_crash_at_any_point() {
    // Restore pool B over a device holding pool A. Every block the restore
    // wrote before its superblock must be one A does not use: then a crash
    // at any point before the superblock write (any subset of those blocks
    // written) leaves A intact.
    let t = tempfile::tempdir().unwrap();
    let dev = kernel_small(t.path());
    let before = std::fs::read(&dev).unwrap();
    let a_dump = dump(&dev);
    let a_used = in_use(&dev);

    // Pool B: A with device 4 gone and device 1's mappings shifted.
    let b_xml: String = a_dump
        .replace("transaction=\"5\"", "transaction=\"6\"")
        .replace("<device dev_id=\"4\"", "<device dev_id=\"7\"");
    let xml = t.path().join("b.xml");
    std::fs::write(&xml, &b_xml).unwrap();
    let r = restore(&xml, &dev);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let after = std::fs::read(&dev).unwrap();
    let mut written = 0;
    for b in 1..before.len() / BLOCK {
        let (x, y) = (&before[b * BLOCK..][..BLOCK], &after[b * BLOCK..][..BLOCK]);
        if x != y {
            written += 1;
            assert!(
                !a_used.contains(b),
                "restore overwrote block {b}, which pool A uses"
            );
        }
    }
    assert!(written > 10);
    // The worst crash: everything but the superblock written.
    let crashed = t.path().join("crashed.img");
    let mut img = after.clone();
    img[..BLOCK].copy_from_slice(&before[..BLOCK]);
    std::fs::write(&crashed, &img).unwrap();
    assert_eq!(dump(&crashed), a_dump);
    check_ok(&crashed);
    // And the committed result is pool B.
    assert_eq!(unnamed(&dump(&dev)), unnamed(&b_xml));
    check_ok(&dev);
}

#[test]
fn bad_xml_is_refused_with_its_position_and_nothing_is_written() {
    let t = tempfile::tempdir().unwrap();
    let dev = kernel_small(t.path());
    let before = std::fs::read(&dev).unwrap();
    let good = dump(&dev);
    let cases: Vec<(&str, String)> = vec![
        (
            "unknown element",
            good.replacen("<single_mapping", "<bogus_mapping", 1),
        ),
        ("missing attribute", good.replacen(" time=\"0\"/>", "/>", 1)),
        ("truncated", good[..good.len() / 2].to_string()),
        (
            "beyond nr_data_blocks",
            good.replacen("data_block=\"23\"", "data_block=\"256\"", 1),
        ),
        (
            "undefined ref",
            good.replacen("<ref name=\"", "<ref name=\"x", 1),
        ),
        (
            "duplicate device",
            good.replacen("dev_id=\"4\"", "dev_id=\"3\"", 1),
        ),
        (
            "overlap",
            good.replacen(
                "<single_mapping origin_block=\"127\"",
                "<single_mapping origin_block=\"99\"",
                1,
            ),
        ),
    ];
    for (what, xml) in cases {
        assert_ne!(xml, good, "{what}: the test did not change the XML");
        let p = t.path().join("bad.xml");
        std::fs::write(&p, &xml).unwrap();
        let out = restore(&p, &dev);
        assert_one_line_error(&out, what);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("line ") && err.contains("column "),
            "{what}: {err}"
        );
        assert_eq!(
            std::fs::read(&dev).unwrap(),
            before,
            "{what}: output touched"
        );
    }
}

#[test]
fn a_too_small_output_is_refused_with_the_size_needed() {
    let t = tempfile::tempdir().unwrap();
    let xml = t.path().join("a.xml");
    std::fs::write(&xml, dump(&fixture_dir().join("meta.img.gz"))).unwrap();
    let out = blank(t.path(), "tiny.img", 8 * BLOCK as u64);
    std::fs::write(&out, vec![7u8; 8 * BLOCK]).unwrap();
    let r = restore(&xml, &out);
    assert_one_line_error(&r, "too small");
    assert!(String::from_utf8_lossy(&r.stderr).contains("needs"));
    assert_eq!(std::fs::read(&out).unwrap(), vec![7u8; 8 * BLOCK]);
}

fn zero_block(img: &Path, b: u64) {
    use std::os::unix::fs::FileExt;
    open_rw(img)
        .write_all_at(&[0u8; BLOCK], b * BLOCK as u64)
        .unwrap();
}

fn repair(input: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["-i", input.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    run("thin_repair", &args)
}

#[test]
fn repair_recovers_lost_roots_from_the_metadata_snapshot_and_a_scan() {
    // The fixture's live details root (55) and top-level mapping root (52)
    // are destroyed. The metadata snapshot still knows all four devices, and
    // device 1's newer tree (written after the snapshot) is found by the scan.
    let t = tempfile::tempdir().unwrap();
    let dev = kernel_small(t.path());
    let want = dump(&dev);
    zero_block(&dev, 52);
    zero_block(&dev, 55);
    assert!(!run("thin_check", &[dev.to_str().unwrap()]).status.success());
    let out = blank(t.path(), "out.img", 4 << 20);
    let r = repair(&dev, &out, &[]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(unnamed(&dump(&out)), unnamed(&want));
    check_ok(&out);
    // thin_dump --repair tells the same story.
    let d = run("thin_dump", &["--repair", dev.to_str().unwrap()]);
    assert!(d.status.success());
    assert_eq!(
        unnamed(&String::from_utf8(d.stdout).unwrap()),
        unnamed(&want)
    );
}

#[test]
fn repair_without_a_superblock_recovers_the_pool() {
    // The metadata snapshot's superblock copy gives the block size; the
    // values the superblock alone held are derived (tests/repair_recovery.rs).
    let t = tempfile::tempdir().unwrap();
    let dev = kernel_small(t.path());
    let want = dump(&dev);
    zero_block(&dev, 0);
    let out = blank(t.path(), "out.img", 4 << 20);
    let r = repair(&dev, &out, &["--nr-data-blocks", "256"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    // Everything is recovered, the pool time too (the latest time the
    // surviving details and mappings carry: the kernel's own here).
    assert_eq!(unnamed(&dump(&out)), unnamed(&want));
    check_ok(&out);
}

#[test]
fn repair_with_nothing_to_recover_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let junk = t.path().join("junk.img");
    std::fs::write(&junk, vec![0x5au8; 64 * BLOCK]).unwrap();
    let out = t.path().join("out.img");
    std::fs::write(&out, vec![1u8; 64 * BLOCK]).unwrap();
    let r = repair(
        &junk,
        &out,
        &["--data-block-size", "128", "--nr-data-blocks", "256"],
    );
    assert_one_line_error(&r, "nothing to recover");
    assert!(String::from_utf8_lossy(&r.stderr).contains("no recoverable"));
    assert_eq!(std::fs::read(&out).unwrap(), vec![1u8; 64 * BLOCK]);
}

#[test]
fn repair_refuses_to_write_over_its_input() {
    let t = tempfile::tempdir().unwrap();
    let dev = kernel_small(t.path());
    let before = std::fs::read(&dev).unwrap();
    let r = repair(&dev, &dev, &[]);
    assert_one_line_error(&r, "same file");
    assert_eq!(std::fs::read(&dev).unwrap(), before);
}

#[test]
fn restoring_over_metadata_that_leaves_too_little_room_still_completes() {
    // The fixture's pool uses ~120 of 1024 blocks; this pool needs ~940, more
    // than is free beside the old one: the old superblock is invalidated
    // first (a crash then leaves no valid-looking metadata), and the whole
    // device is used.
    let t = tempfile::tempdir().unwrap();
    let dev = kernel_small(t.path());
    let xml = t.path().join("big.xml");
    std::fs::write(
        &xml,
        "<superblock uuid=\"\" time=\"0\" transaction=\"1\" data_block_size=\"128\" nr_data_blocks=\"230000\">\n\
         <device dev_id=\"1\" mapped_blocks=\"230000\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n\
         <range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"230000\" time=\"0\"/>\n\
         </device>\n</superblock>\n",
    )
    .unwrap();
    let r = restore(&xml, &dev);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    check_ok(&dev);
    assert!(dump(&dev).contains("length=\"230000\""));
}

#[test]
fn restoring_over_old_metadata_measures_the_packed_layout_exactly() {
    // First restore: 1234 of 2000 blocks. The second cannot fit beside it,
    // so its dry run (which avoids the old blocks) runs past the end of the
    // device, and the 397 leaves of the def, shared 3 ways, are counted
    // there: their ref-count entries must be measured too, or the packed
    // write allocates more than was measured (refused before the commit).
    let t = tempfile::tempdir().unwrap();
    let dev = blank(t.path(), "dev.img", 2000 * BLOCK as u64);
    let xml = t.path().join("shared.xml");
    let mut text = String::from(
        "<superblock uuid=\"\" time=\"0\" transaction=\"1\" data_block_size=\"128\" nr_data_blocks=\"300000\">\n\
         <device dev_id=\"1\" mapped_blocks=\"200000\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n\
         <range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"200000\" time=\"0\"/>\n\
         </device>\n\
         <def name=\"0\">\n<range_mapping origin_begin=\"0\" data_begin=\"200000\" length=\"100000\" time=\"0\"/>\n</def>\n",
    );
    for id in 2..5 {
        text += &format!(
            "<device dev_id=\"{id}\" mapped_blocks=\"100000\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n<ref name=\"0\"/>\n</device>\n"
        );
    }
    text += "</superblock>\n";
    std::fs::write(&xml, text).unwrap();
    for pass in ["empty device", "over the first restore"] {
        let r = restore(&xml, &dev);
        assert!(
            r.status.success(),
            "{pass}: {}",
            String::from_utf8_lossy(&r.stderr)
        );
        check_ok(&dev);
    }
    assert!(dump(&dev).contains("<ref name="));
}

#[test]
fn a_wrong_mapped_blocks_is_corrected_with_a_note() {
    let t = tempfile::tempdir().unwrap();
    let good = dump(&fixture_dir().join("meta.img.gz"));
    let bad = good.replacen("mapped_blocks=\"27\"", "mapped_blocks=\"99\"", 1);
    assert_ne!(bad, good);
    let xml = t.path().join("a.xml");
    std::fs::write(&xml, &bad).unwrap();
    let out = blank(t.path(), "r.img", 4 << 20);
    let r = restore(&xml, &out);
    assert!(r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("mapped_blocks=\"99\" but it has 27 mappings"),
        "{err}"
    );
    check_ok(&out);
    assert_eq!(unnamed(&dump(&out)), unnamed(&good));
}

#[test]
fn dump_repair_refuses_options_it_cannot_honour() {
    let img = fixture_dir().join("meta.img.gz");
    for extra in [["-m"], ["--skip-mappings"]] {
        let mut args = vec!["--repair"];
        args.extend_from_slice(&extra);
        args.push(img.to_str().unwrap());
        assert_eq!(run("thin_dump", &args).status.code(), Some(64), "{extra:?}");
    }
}
