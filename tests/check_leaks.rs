//! thin_check on leaked blocks, and its option rules: LVM's default
//! `-q --clear-needs-check-flag` frees leaked metadata blocks (as
//! `--auto-repair`) and clears needs_check; `--auto-repair` refuses the
//! options that weaken the check; `--super-block-only` reads block 0 only.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use thinmeta::pdata::io::{BlockDevice, OpenMode};
use thinmeta::pdata::BLOCK_SIZE;
use thinmeta::thin::check::{check, rebuild_space_maps, CheckOptions};
use thinmeta::thin::superblock::{read_superblock, NEEDS_CHECK_FLAG};

/// A copy of the kernel fixture whose space maps count `meta_leaks` and
/// `data_leaks` (free blocks in the fixture) as in use, written the way
/// `--auto-repair` writes space maps, so nothing else differs.
fn leaky_copy(
    dir: &Path,
    name: &str,
    meta_leaks: &[u64],
    data_leaks: &[u64],
    flagged: bool,
) -> PathBuf {
    damaged_copy(dir, name, meta_leaks, data_leaks, &[], flagged)
}

/// As [`leaky_copy`], and the data space map also under-counts the mapped
/// data blocks `data_under` (damage: the kernel would hand them out again).
fn damaged_copy(
    dir: &Path,
    name: &str,
    meta_leaks: &[u64],
    data_leaks: &[u64],
    data_under: &[u64],
    flagged: bool,
) -> PathBuf {
    // Damage a scratch copy, then copy it to `name`: a child process another
    // test thread forks while we hold the exclusive flock inherits the lock
    // until it execs, and would make the tools run on `name` see it busy.
    // The copy is a new inode that no such child can hold.
    let scratch = unpack(
        &fixture_dir().join("meta.img.gz"),
        dir,
        &format!("{name}.scratch"),
    );
    let p = dir.join(name);
    {
        let dev = BlockDevice::open(&scratch, OpenMode::ReadWriteExclusive).unwrap();
        let opts = CheckOptions {
            keep_counts: true,
            ..Default::default()
        };
        let rep = check(&dev, &opts, &mut |_, _| {});
        assert!(rep.findings.is_empty(), "{:?}", rep.findings);
        let sb = rep.superblock.unwrap();
        let mut counts = rep.counts.unwrap();
        for &b in meta_leaks {
            assert_eq!(counts.metadata.get(b), 0, "metadata block {b} is free");
            counts.metadata.inc(b);
        }
        for &b in data_leaks {
            assert_eq!(counts.data.get(b), 0, "data block {b} is free");
            counts.data.inc(b);
        }
        for &b in data_under {
            assert!(counts.data.get(b) > 0, "data block {b} is mapped");
            counts.data.dec(b);
        }
        let flags = if flagged { NEEDS_CHECK_FLAG } else { 0 };
        rebuild_space_maps(&dev, &sb, counts, flags).unwrap();
    }
    std::fs::copy(&scratch, &p).unwrap();
    std::fs::remove_file(&scratch).unwrap();
    p
}

fn needs_check(p: &Path) -> bool {
    let dev = BlockDevice::open(p, OpenMode::ReadOnly).unwrap();
    read_superblock(&dev, 0).unwrap().needs_check()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Metadata blocks the space map of `p` counts as in use.
fn in_use(p: &Path) -> fixedbitset::FixedBitSet {
    let dev = BlockDevice::open(p, OpenMode::ReadOnly).unwrap();
    let sb = read_superblock(&dev, 0).unwrap();
    let mut w = thinmeta::pdata::btree::Walker::new(&dev);
    let (sm, errs) =
        thinmeta::pdata::space_map::DiskSpaceMap::load_metadata(&mut w, sb.metadata_sm());
    assert!(errs.is_empty());
    sm.in_use(&dev).unwrap()
}

/// The current and the metadata snapshot's dumps, without the flags
/// (needs_check is cleared on purpose).
fn dumps(p: &Path) -> (String, String) {
    let text = |args: &[&str]| {
        let out = run("thin_dump", args);
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8(out.stdout)
            .unwrap()
            .replace(" flags=\"1\"", "")
    };
    (text(&[s(p)]), text(&["-m", s(p)]))
}

/// Run thin_check with `args` on `p` and require that it frees the leaks:
/// exit 0, needs_check clear, a plain check passes, the mappings and the
/// metadata snapshot are unchanged, and only block 0 and blocks the old
/// metadata did not use were written (a crash before the superblock write
/// leaves the old metadata whole).
fn assert_frees_leaks(p: &Path, args: &[&str]) -> String {
    let out = run("thin_check", &[s(p)]);
    assert_eq!(out.status.code(), Some(65), "leaks fail a plain check");
    let before = std::fs::read(p).unwrap();
    let old_in_use = in_use(p);
    let dumped = dumps(p);
    let mut all = args.to_vec();
    all.push(s(p));
    let out = run("thin_check", &all);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
    assert!(!needs_check(p), "{args:?} clears needs_check");
    let out = run("thin_check", &[s(p)]);
    assert!(out.status.success(), "after {args:?}: {}", stderr(&out));
    assert_eq!(dumps(p), dumped, "{args:?}: mappings unchanged");
    let after = std::fs::read(p).unwrap();
    assert_eq!(before.len(), after.len());
    let mut written = 0;
    for blk in 0..before.len() / BLOCK_SIZE {
        let r = blk * BLOCK_SIZE..(blk + 1) * BLOCK_SIZE;
        if before[r.clone()] != after[r] {
            written += 1;
            assert!(
                blk == 0 || !old_in_use.contains(blk),
                "{args:?} overwrote block {blk}, in use by the old metadata"
            );
        }
    }
    assert!(
        written >= 2,
        "new space maps and the superblock were written"
    );
    err
}

#[test]
fn lvm_default_options_free_metadata_leaks_and_clear_needs_check() {
    let dir = tempfile::tempdir().unwrap();
    for flagged in [true, false] {
        let p = leaky_copy(dir.path(), "m.img", &[700, 701, 1000], &[], flagged);
        let out = run("thin_check", &[s(&p)]);
        assert!(
            stderr(&out).contains("3 metadata blocks have leaked"),
            "{}",
            stderr(&out)
        );
        assert_eq!(needs_check(&p), flagged);
        let err = assert_frees_leaks(&p, &["-q", "--clear-needs-check-flag"]);
        assert!(err.is_empty(), "-q is quiet: {err}");
        let out = run("thin_check", &[s(&p)]);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("METADATA_FREE_BLOCKS=1008"),
            "the three blocks are free again"
        );
    }
    // Without -q it says what it did.
    let p = leaky_copy(dir.path(), "m.img", &[700], &[], true);
    let err = assert_frees_leaks(&p, &["--clear-needs-check-flag"]);
    assert!(
        err.contains("1 leaked metadata blocks are free again"),
        "{err}"
    );
}

/// Make the superblock's metadata space-map root under-count its
/// allocated blocks by `by` (as a crash between bitmap and root updates, or
/// the peer's leak generator, leaves it).
fn lag_root_counter(p: &Path, by: u64) {
    let dev = BlockDevice::open(p, OpenMode::ReadOnly).unwrap();
    let mut sb = read_superblock(&dev, 0).unwrap();
    let mut root = sb.metadata_sm();
    root.nr_allocated -= by;
    sb.metadata_sm_root = thinmeta::thin::superblock::Superblock::sm_root_bytes(&root);
    open_rw(p).write_all_at(&sb.encode(), 0).unwrap();
}

#[test]
fn leaks_with_stale_space_map_counters_are_freed() {
    let dir = tempfile::tempdir().unwrap();
    for (leaks, lag) in [(&[700u64, 701][..], 2), (&[][..], 1)] {
        let p = leaky_copy(dir.path(), "c.img", leaks, &[], true);
        lag_root_counter(&p, lag);
        let out = run("thin_check", &[s(&p)]);
        let err = stderr(&out);
        assert!(
            err.contains("blocks are allocated; its bitmaps count"),
            "{err}"
        );
        assert!(err.contains("0 fatal"), "{err}");
        assert_frees_leaks(&p, &["-q", "--clear-needs-check-flag"]);
    }
}

#[test]
fn data_leaks_are_freed_as_the_peer_frees_them() {
    // The peer (1.3.3) frees leaked data blocks for --clear-needs-check-flag
    // and --auto-repair alike, with or without needs_check set.
    let dir = tempfile::tempdir().unwrap();
    for args in [
        &["-q", "--clear-needs-check-flag"][..],
        &["--auto-repair"][..],
        &["--clear-needs-check-flag", "--ignore-non-fatal-errors"][..],
    ] {
        for flagged in [true, false] {
            let p = leaky_copy(dir.path(), "d.img", &[], &[200, 201], flagged);
            let out = run("thin_check", &[s(&p)]);
            assert!(
                stderr(&out).contains("2 data blocks have leaked"),
                "{}",
                stderr(&out)
            );
            assert_frees_leaks(&p, args);
            let p = leaky_copy(dir.path(), "b.img", &[700], &[200], flagged);
            assert_frees_leaks(&p, args);
        }
    }
}

#[test]
fn ignore_non_fatal_errors_accepts_leaks_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = leaky_copy(dir.path(), "b.img", &[700], &[200], true);
    let before = std::fs::read(&p).unwrap();
    let out = run("thin_check", &["--ignore-non-fatal-errors", s(&p)]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&p).unwrap(), before, "nothing written");
    assert_eq!(run("thin_check", &[s(&p)]).status.code(), Some(65));
}

#[test]
fn worse_than_leaks_refuses_and_writes_nothing() {
    // Leaks plus a data block the space map under-counts (data block 42 is
    // mapped once, by device 1, and counted 0): fatal, nothing is written.
    let dir = tempfile::tempdir().unwrap();
    let p = damaged_copy(dir.path(), "x.img", &[700], &[200], &[42], true);
    let before = std::fs::read(&p).unwrap();
    for args in [
        &["-q", "--clear-needs-check-flag"][..],
        &["--clear-needs-check-flag"][..],
        &["--clear-needs-check-flag", "--ignore-non-fatal-errors"][..],
        &["--auto-repair"][..],
    ] {
        let mut all = args.to_vec();
        all.push(s(&p));
        let out = run("thin_check", &all);
        assert_eq!(out.status.code(), Some(65), "{args:?}: {}", stderr(&out));
        if !args.contains(&"-q") {
            let err = stderr(&out);
            assert!(err.contains("wrong reference counts"), "{err}");
            assert!(err.contains("nothing was written"), "{err}");
        }
        assert_eq!(std::fs::read(&p).unwrap(), before, "{args:?} wrote");
    }

    // Leaks plus a non-fatal finding that is not a leak (mappings written
    // after the pool's time): freeing the leaks would not make the check
    // pass, so nothing is written unless that finding is ignored.
    let p = leaky_copy(dir.path(), "t.img", &[700], &[], true);
    {
        let f = open_rw(&p);
        let dev = BlockDevice::open(&p, OpenMode::ReadOnly).unwrap();
        let mut sb = read_superblock(&dev, 0).unwrap();
        assert_eq!(sb.time, 2);
        sb.time = 1;
        f.write_all_at(&sb.encode(), 0).unwrap();
    }
    let before = std::fs::read(&p).unwrap();
    let out = run("thin_check", &["--clear-needs-check-flag", s(&p)]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(65), "{err}");
    assert!(err.contains("after the pool's time"), "{err}");
    assert_eq!(std::fs::read(&p).unwrap(), before, "nothing written");
    let out = run(
        "thin_check",
        &[
            "--clear-needs-check-flag",
            "--ignore-non-fatal-errors",
            s(&p),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(!needs_check(&p));
    assert!(run("thin_check", &["--ignore-non-fatal-errors", s(&p)])
        .status
        .success());
    let out = run("thin_check", &[s(&p)]);
    assert!(!stderr(&out).contains("leaked"), "{}", stderr(&out));
}

#[test]
fn auto_repair_refuses_options_that_weaken_the_check() {
    let dir = tempfile::tempdir().unwrap();
    let p = leaky_copy(dir.path(), "m.img", &[700], &[200], true);
    let before = std::fs::read(&p).unwrap();
    for args in [
        &["--auto-repair", "--ignore-non-fatal-errors"][..],
        &["--auto-repair", "--skip-mappings"][..],
        &["--auto-repair", "--super-block-only"][..],
        &["--auto-repair", "-m"][..],
        &["--auto-repair", "--override-mapping-root", "52"][..],
        &["--auto-repair", "--override-details-root", "55"][..],
        &["--clear-needs-check-flag", "-m"][..],
        &["--clear-needs-check-flag", "--override-mapping-root", "52"][..],
        &["--clear-needs-check-flag", "--override-details-root", "55"][..],
        &[
            "--auto-repair",
            "--clear-needs-check-flag",
            "--skip-mappings",
        ][..],
    ] {
        let mut all = args.to_vec();
        all.push(s(&p));
        let out = run("thin_check", &all);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert_one_line_error(&out, &format!("{args:?}"));
        assert_eq!(std::fs::read(&p).unwrap(), before, "{args:?} wrote");
    }
    assert!(needs_check(&p));
}

#[test]
fn clear_needs_check_after_a_weaker_check_clears_only_the_flag() {
    // As the peer: --clear-needs-check-flag with --super-block-only or
    // --skip-mappings clears the flag once that check passes; it cannot see
    // leaks, so it leaves them (and a full check still reports them).
    let dir = tempfile::tempdir().unwrap();
    for opt in ["--super-block-only", "--skip-mappings"] {
        let p = leaky_copy(dir.path(), "m.img", &[700], &[200], true);
        let before = std::fs::read(&p).unwrap();
        let out = run("thin_check", &["--clear-needs-check-flag", opt, s(&p)]);
        assert!(out.status.success(), "{opt}: {}", stderr(&out));
        assert!(!needs_check(&p));
        let after = std::fs::read(&p).unwrap();
        let changed: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        assert!(
            !changed.is_empty() && changed.iter().all(|&i| i < 8),
            "{opt}: only the checksum and flags change: {changed:?}"
        );
        assert_eq!(run("thin_check", &[s(&p)]).status.code(), Some(65));
    }
}

#[test]
fn super_block_only_reads_only_the_superblock() {
    let dir = tempfile::tempdir().unwrap();
    let p = unpack(&fixture_dir().join("meta.img.gz"), dir.path(), "one.img");
    let full = std::fs::read(&p).unwrap();
    std::fs::write(&p, &full[..BLOCK_SIZE]).unwrap();
    let out = run("thin_check", &["--super-block-only", s(&p)]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("TRANSACTION_ID=5"), "{stdout}");
    assert!(stdout.contains("METADATA_FREE_BLOCKS=1008"), "{stdout}");
    assert!(stderr(&out).is_empty(), "{}", stderr(&out));
    assert_eq!(std::fs::read(&p).unwrap(), &full[..BLOCK_SIZE]);
    // The full check needs the trees.
    let out = run("thin_check", &[s(&p)]);
    assert_eq!(out.status.code(), Some(65));
    assert!(stderr(&out).contains("beyond the end"), "{}", stderr(&out));

    // A broken superblock still fails it.
    let mut b = full[..BLOCK_SIZE].to_vec();
    b[100] ^= 0xff;
    std::fs::write(&p, &b).unwrap();
    let out = run("thin_check", &["--super-block-only", s(&p)]);
    assert_eq!(out.status.code(), Some(65));
    assert!(stderr(&out).contains("bad checksum in superblock"));
    std::fs::write(&p, vec![0u8; BLOCK_SIZE]).unwrap();
    let out = run("thin_check", &["--super-block-only", s(&p)]);
    assert_eq!(out.status.code(), Some(65));
}

#[test]
fn input_that_is_not_binary_metadata_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let meta = unpack(&fixture_dir().join("meta.img.gz"), d, "meta.img");
    let xml = run("thin_dump", &[s(&meta)]).stdout;
    assert!(xml.len() < BLOCK_SIZE, "the fixture's dump is one block");
    let mut padded = xml.clone();
    padded.resize(3 * BLOCK_SIZE, b' ');
    let mut decl = b"<?xml version=\"1.0\"?>\n".to_vec();
    decl.extend_from_slice(&padded);
    for (name, bytes) in [
        ("small.xml", &xml),
        ("big.xml", &padded),
        ("decl.xml", &decl),
    ] {
        let p = d.join(name);
        std::fs::write(&p, bytes).unwrap();
        for args in [&[][..], &["-q"][..], &["--super-block-only"][..]] {
            let mut all = args.to_vec();
            all.push(s(&p));
            let out = run("thin_check", &all);
            assert_one_line_error(&out, name);
            assert_eq!(out.status.code(), Some(66));
            let err = stderr(&out);
            assert!(
                err.contains(
                    "This looks like XML.  This tool only supports the binary metadata format."
                ) && err.contains("thin_restore"),
                "{name} {args:?}: {err}"
            );
        }
    }

    let p = d.join("tiny.img");
    std::fs::write(&p, &std::fs::read(&meta).unwrap()[..100]).unwrap();
    let out = run("thin_check", &[s(&p)]);
    assert_one_line_error(&out, "tiny");
    assert!(
        stderr(&out).contains("Metadata device/file too small.  Is this binary metadata?"),
        "{}",
        stderr(&out)
    );

    // A bad superblock checksum, in the peer's words and with the block.
    let f = open_rw(&meta);
    f.write_all_at(&[0x5a], 200).unwrap();
    let out = run("thin_check", &[s(&meta)]);
    assert_eq!(out.status.code(), Some(65));
    let err = stderr(&out);
    assert!(err.contains("block 0: bad checksum in superblock"), "{err}");
    assert!(!err.contains("XML"), "{err}");
    // All zeros: no superblock at all, and no valid checksum either.
    f.write_all_at(&[0u8; BLOCK_SIZE], 0).unwrap();
    let out = run("thin_check", &[s(&meta)]);
    assert_eq!(out.status.code(), Some(65));
    let err = stderr(&out);
    assert!(
        err.contains("bad checksum in superblock") && err.contains("all zeros"),
        "{err}"
    );
}
