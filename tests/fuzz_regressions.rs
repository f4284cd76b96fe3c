//! Replays the fuzz inputs committed in the repository under plain
//! `cargo test`: every crash the fuzzers found (`fuzz/regressions/<target>/`)
//! and the seed corpus (`fuzz/corpus/<target>/`), through the same harnesses
//! the cargo-fuzz targets call (`thinmeta::fuzzing`, src/fuzzing.rs).
//!
//! `cargo test --test fuzz_regressions -- --ignored write_seeds` rewrites
//! the seed corpus with the project's own writers.

mod common;

use std::path::{Path, PathBuf};

use thinmeta::fuzzing::{self, TARGETS};
use thinmeta::pdata::io::OpenMode;
use thinmeta::thin::check::check;

fn fuzz_dir() -> PathBuf {
    common::repo().join("fuzz")
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

fn replay(sub: &str) -> usize {
    let mut n = 0;
    for (name, f) in TARGETS {
        for p in files(&fuzz_dir().join(sub).join(name)) {
            let data = std::fs::read(&p).unwrap();
            let r = std::panic::catch_unwind(|| f(&data));
            assert!(r.is_ok(), "{name}: {} panics", p.display());
            n += 1;
        }
    }
    n
}

#[test]
fn crashing_inputs_found_by_fuzzing_no_longer_crash() {
    let n = replay("regressions");
    eprintln!("replayed {n} regression inputs");
}

#[test]
fn seed_corpus_replays() {
    let n = replay("corpus");
    // Every target has seeds.
    for (name, _) in TARGETS {
        assert!(
            !files(&fuzz_dir().join("corpus").join(name)).is_empty(),
            "no seeds for {name}"
        );
    }
    assert!(n >= TARGETS.len());
}

/// The patch harness gets past the checksums: a re-sealed patch of the
/// superblock's transaction id is read back; the same patch without
/// re-sealing is a checksum failure.
#[test]
fn patches_are_resealed() {
    let base = fuzzing::base();
    let sb_index = base.live.iter().position(|(b, _)| *b == 0).unwrap() as u8;
    let patch = |op: u8| {
        let mut p = vec![op, sb_index, 48, 0, 8];
        p.extend_from_slice(&77u64.to_le_bytes());
        p
    };
    let run = |img: Vec<u8>| {
        let m = fuzzing::MemFile::new("t");
        m.set(&img);
        check(
            &m.open(OpenMode::ReadOnly),
            &Default::default(),
            &mut |_, _| {},
        )
    };
    assert!(run(fuzzing::patched_image(&[])).passed(false));
    let sealed = run(fuzzing::patched_image(&patch(0)));
    assert_eq!(sealed.superblock.as_ref().unwrap().transaction_id, 77);
    let raw = run(fuzzing::patched_image(&patch(1)));
    assert!(raw.superblock.is_none());
    assert!(!raw.passed(false));
    // A stale copy of another node over a live one, re-sealed with its new
    // location: checksums pass, the check must still catch it.
    let node = base.live.iter().position(|(b, _)| *b != 0).unwrap() as u8;
    let other = base.live.len() as u8 - 1;
    let copy = run(fuzzing::patched_image(&[2, node, 0, 0, 1, other]));
    assert!(copy.superblock.is_some());
}

/// Rewrites fuzz/corpus/ from the project's own writers.
#[test]
#[ignore]
fn write_seeds() {
    use std::io::Write;
    let corpus = fuzz_dir().join("corpus");
    let put = |target: &str, name: &str, bytes: &[u8]| {
        let d = corpus.join(target);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::File::create(d.join(name))
            .unwrap()
            .write_all(bytes)
            .unwrap();
    };
    // Binary-metadata targets: no patches (the base image) with each option set.
    for t in [
        "thin_check",
        "thin_dump",
        "thin_repair",
        "thin_query",
        "thin_message",
    ] {
        for c in [0u8, 1, 2, 3, 4, 5, 6, 7, 8, 16, 17, 32, 64, 128] {
            put(t, &format!("cfg-{c}"), &fuzzing::seed(c));
        }
    }
    // XML: thin_dump's output for kernel-small and a generated pool.
    let ks = common::repo().join("tests/data/kernel-small/meta.img.gz");
    let xml = common::run("thin_dump", &[ks.to_str().unwrap()]);
    assert!(xml.status.success());
    let snap = common::run("thin_dump", &["-m", ks.to_str().unwrap()]);
    assert!(snap.status.success());
    let dir = tempfile::tempdir().unwrap();
    let gen = dir.path().join("gen.xml");
    let g = common::run(
        "thin_generate_metadata",
        &[
            "-o",
            gen.to_str().unwrap(),
            "--format",
            "xml",
            "--segments",
            "3",
            "--snaps",
            "2",
        ],
    );
    assert!(g.status.success(), "{}", String::from_utf8_lossy(&g.stderr));
    let xmls = vec![
        ("kernel-small.xml", xml.stdout),
        ("kernel-small-m.xml", snap.stdout),
        ("generated.xml", std::fs::read(&gen).unwrap()),
    ];
    for (n, x) in &xmls {
        put("thin_restore", n, x);
        put("thin_shrink_xml", n, x);
    }
    // A pack of kernel-small, written by thin_metadata_pack.
    let pack = dir.path().join("ks.pack");
    let p = common::run(
        "thin_metadata_pack",
        &["-i", ks.to_str().unwrap(), "-o", pack.to_str().unwrap()],
    );
    assert!(p.status.success(), "{}", String::from_utf8_lossy(&p.stderr));
    put(
        "thin_metadata_unpack",
        "kernel-small.pack",
        &std::fs::read(&pack).unwrap(),
    );
    // COW stores: header and one or two areas of exceptions, written with
    // the snapshot module's own record writer.
    use thinmeta::snapshot::cow::{put_record, Exception, Header};
    for (name, chunk_sectors, records) in [
        (
            "cow-8-runs",
            8u32,
            vec![(0u64, 2u64), (1, 3), (2, 4), (10, 5), (7, 6)],
        ),
        ("cow-1-one", 1, vec![(5, 2)]),
        ("cow-2-empty", 2, vec![]),
    ] {
        let chunk = chunk_sectors as usize * 512;
        let mut b = vec![0u8; chunk * 16];
        b[..16].copy_from_slice(&Header::new(chunk_sectors).to_bytes());
        for (i, (old, new)) in records.into_iter().enumerate() {
            put_record(&mut b[chunk..2 * chunk], i, Exception { old, new });
        }
        // cfg 0: the store's size in KiB follows; only the header and the
        // first area are given (the rest reads as zeros).
        let mut input = vec![0u8];
        input.extend_from_slice(&((b.len() / 1024) as u32).to_le_bytes());
        input.extend_from_slice(&b[..2 * chunk]);
        put("snap", name, &input);
    }
}

/// thin_shrink's XML path kept one bit per data block of the declared pool,
/// allocated without a check: an XML claiming 2^62 blocks aborted the
/// process (memory allocation failed). The planner now works on runs of
/// used blocks, so the empty pool shrinks like any other.
#[test]
fn shrink_xml_with_a_huge_pool_is_planned_not_an_abort() {
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("huge.xml");
    std::fs::write(
        &xml,
        "<superblock uuid=\"\" time=\"0\" transaction=\"1\" data_block_size=\"128\" nr_data_blocks=\"4611686018427387904\">\n</superblock>\n",
    )
    .unwrap();
    let data = dir.path().join("data.img");
    std::fs::write(&data, b"").unwrap();
    let out = dir.path().join("out.xml");
    let r = common::run(
        "thin_shrink",
        &[
            "-i",
            xml.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--nr-blocks",
            "10",
        ],
    );
    assert_eq!(r.status.code(), Some(0), "{r:?}");
    let shrunk = std::fs::read_to_string(&out).unwrap();
    assert!(shrunk.contains("nr_data_blocks=\"10\""), "{shrunk}");
}

/// thin_restore wrote mappings (and device times) later than the pool's
/// time as they were: its own output then failed thin_check, and the kernel
/// would take such a block for unshared after the next snapshot. The pool's
/// time is now raised to the latest time found, with a note.
#[test]
fn restore_raises_the_pool_time_to_the_latest_mapping_time() {
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("t.xml");
    std::fs::write(
        &xml,
        "<superblock uuid=\"\" time=\"2\" transaction=\"3\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"100\">\n  <device dev_id=\"1\" mapped_blocks=\"3\" transaction=\"0\" creation_time=\"0\" snap_time=\"1\">\n    <range_mapping origin_begin=\"0\" data_begin=\"10\" length=\"2\" time=\"1\"/>\n    <single_mapping origin_block=\"7\" data_block=\"20\" time=\"5\"/>\n  </device>\n</superblock>\n",
    )
    .unwrap();
    let img = dir.path().join("meta.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let r = common::run(
        "thin_restore",
        &["-i", xml.to_str().unwrap(), "-o", img.to_str().unwrap()],
    );
    assert!(r.status.success(), "{r:?}");
    assert!(String::from_utf8_lossy(&r.stderr).contains("carries time 5"));
    let c = common::run("thin_check", &[img.to_str().unwrap()]);
    assert!(c.status.success(), "{c:?}");
    let d = common::run("thin_dump", &[img.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&d.stdout).starts_with("<superblock uuid=\"\" time=\"5\""));
}

/// The pool writer (thin_restore, thin_repair, thin_shrink --binary) made
/// its data reference counts (2 bits per data block) before anything else:
/// a pool size from an XML file, or from a damaged data space map root that
/// thin_repair read, aborted the process (an 80 GB allocation). A size
/// whose space map cannot fit on the output is now refused first.
#[test]
fn restore_refuses_a_pool_size_the_output_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("t.xml");
    std::fs::write(
        &xml,
        "<superblock uuid=\"\" time=\"0\" transaction=\"1\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"1099511627776\">\n</superblock>\n",
    )
    .unwrap();
    let img = dir.path().join("meta.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let r = common::run(
        "thin_restore",
        &["-i", xml.to_str().unwrap(), "-o", img.to_str().unwrap()],
    );
    assert_eq!(r.status.code(), Some(66), "{r:?}");
    common::assert_one_line_error(&r, "huge pool");
    assert!(String::from_utf8_lossy(&r.stderr).contains("Output file too small"));
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0));
}
