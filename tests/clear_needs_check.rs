//! thin_check --clear-needs-check-flag (LVM's default): clears the flag only
//! after a passing check, and writes nothing otherwise.

mod common;

use std::os::unix::fs::FileExt;

use common::*;
use thinmeta::pdata::BLOCK_SIZE;
use thinmeta::thin::superblock::{set_flags, Superblock, NEEDS_CHECK_FLAG};

fn flagged_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let p = unpack(&fixture_dir().join("meta.img.gz"), dir, "meta.img");
    let f = open_rw(&p);
    let mut b = vec![0u8; BLOCK_SIZE];
    f.read_exact_at(&mut b, 0).unwrap();
    set_flags(&mut b, NEEDS_CHECK_FLAG);
    f.write_all_at(&b, 0).unwrap();
    p
}

fn needs_check(p: &std::path::Path) -> bool {
    let bytes = std::fs::read(p).unwrap();
    Superblock::parse(0, &bytes[..BLOCK_SIZE])
        .unwrap()
        .needs_check()
}

#[test]
fn flag_is_cleared_after_a_passing_check_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = flagged_copy(dir.path());
    assert!(needs_check(&p));
    let dump = run("thin_dump", &[p.to_str().unwrap()]);
    assert!(
        String::from_utf8_lossy(&dump.stdout).contains(" flags=\"1\" "),
        "dump shows the flag"
    );

    let before = std::fs::read(&p).unwrap();
    let out = run(
        "thin_check",
        &["-q", "--clear-needs-check-flag", p.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!needs_check(&p));
    let after = std::fs::read(&p).unwrap();
    // Only the flags word and the checksum of block 0 changed.
    let changed: Vec<usize> = (0..before.len())
        .filter(|&i| before[i] != after[i])
        .collect();
    assert!(changed.iter().all(|&i| i < 8), "changed bytes {changed:?}");

    // A failing check leaves the device untouched.
    let p2 = flagged_copy(dir.path());
    let f = open_rw(&p2);
    f.write_all_at(&[0xff], 55 * BLOCK_SIZE as u64 + 100)
        .unwrap(); // details tree root
    let before = std::fs::read(&p2).unwrap();
    let out = run(
        "thin_check",
        &["--clear-needs-check-flag", p2.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(65));
    assert_eq!(std::fs::read(&p2).unwrap(), before, "nothing written");
    assert!(needs_check(&p2));
}
