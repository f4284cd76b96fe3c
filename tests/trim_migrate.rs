//! thin_trim on kernel-small (a pool the kernel wrote) with its data image
//! as a regular file and as a loop device; thin_migrate's argument and
//! source checks (the copy itself needs a live pool: tests/kernel/prove
//! migrate).

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use sha2::{Digest, Sha256};
use thinmeta::thin::superblock::{set_flags, NEEDS_CHECK_FLAG};

const BLOCK: u64 = 65536;

/// The data blocks kernel-small's live dump and metadata-snapshot dump map.
fn mapped_blocks(meta: &Path) -> Vec<bool> {
    let mut used = vec![false; 256];
    for args in [vec![], vec!["-m"]] {
        let mut a = args.clone();
        a.push(meta.to_str().unwrap());
        let out = run("thin_dump", &a);
        assert!(out.status.success());
        for line in String::from_utf8(out.stdout).unwrap().lines() {
            let num = |k: &str| -> Option<u64> {
                let key = format!(" {k}=\"");
                let i = line.find(&key)? + key.len();
                line[i..].split('"').next()?.parse().ok()
            };
            if line.contains("<single_mapping") {
                used[num("data_block").unwrap() as usize] = true;
            } else if line.contains("<range_mapping") {
                let (b, n) = (num("data_begin").unwrap(), num("length").unwrap());
                for d in b..b + n {
                    used[d as usize] = true;
                }
            }
        }
    }
    used
}

/// (data offset, length) of the holes of a sparse file, in bytes.
fn holes(path: &Path) -> Vec<(u64, u64)> {
    let f = std::fs::File::open(path).unwrap();
    let fd = std::os::unix::io::AsRawFd::as_raw_fd(&f);
    let size = f.metadata().unwrap().len() as i64;
    let mut out = Vec::new();
    let mut off = 0i64;
    while off < size {
        // SAFETY: lseek on an open descriptor.
        let h = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
        if h < 0 || h >= size {
            break;
        }
        let d = unsafe { libc::lseek(fd, h, libc::SEEK_DATA) };
        let d = if d < 0 { size } else { d };
        out.push((h as u64, (d - h) as u64));
        off = d;
    }
    out
}

struct Pool {
    _dir: tempfile::TempDir,
    meta: PathBuf,
    data: PathBuf,
    data_before: Vec<u8>,
    meta_before: Vec<u8>,
}

fn pool() -> Pool {
    let dir = tempfile::tempdir().unwrap();
    let meta = unpack(&fixture_dir().join("meta.img.gz"), dir.path(), "meta.img");
    let data = unpack(&fixture_dir().join("data.img.gz"), dir.path(), "data.img");
    // Mark every data block, used or free, so a discard shows as zeros.
    let f = open_rw(&data);
    let mut bytes = std::fs::read(&data).unwrap();
    for b in 0..256u64 {
        let stamp = format!("data block {b} ");
        let at = (b * BLOCK + BLOCK - 512) as usize;
        bytes[at..at + stamp.len()].copy_from_slice(stamp.as_bytes());
        f.write_all_at(stamp.as_bytes(), b * BLOCK + BLOCK - 512)
            .unwrap();
    }
    f.sync_all().unwrap();
    Pool {
        meta_before: std::fs::read(&meta).unwrap(),
        data_before: bytes,
        _dir: dir,
        meta,
        data,
    }
}

/// After a trim: every mapped block unchanged, every free block zero, the
/// metadata unchanged.
fn assert_trimmed(p: &Pool) {
    let used = mapped_blocks(&p.meta);
    let after = std::fs::read(&p.data).unwrap();
    assert_eq!(after.len(), p.data_before.len());
    let (mut kept, mut zeroed) = (0, 0);
    for (b, &u) in used.iter().enumerate() {
        let r = b * BLOCK as usize..(b + 1) * BLOCK as usize;
        if u {
            assert_eq!(
                after[r.clone()],
                p.data_before[r],
                "mapped block {b} changed"
            );
            kept += 1;
        } else {
            assert!(after[r].iter().all(|&x| x == 0), "free block {b} not zero");
            zeroed += 1;
        }
    }
    assert_eq!((kept, zeroed), (43, 213));
    assert_eq!(
        std::fs::read(&p.meta).unwrap(),
        p.meta_before,
        "metadata written"
    );
}

#[test]
fn trim_punches_exactly_the_free_blocks_of_a_data_file() {
    let p = pool();
    assert!(holes(&p.data).is_empty());
    let out = run(
        "thin_trim",
        &[
            "--metadata-dev",
            p.meta.to_str().unwrap(),
            "--data-dev",
            p.data.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stderr.is_empty());
    assert!(String::from_utf8_lossy(&out.stdout)
        .contains("discarded 213 free data blocks in 1 range (13959168 bytes)"));
    assert_trimmed(&p);
    // The free blocks are holes now (kernel-small uses blocks 0-42).
    assert_eq!(holes(&p.data), vec![(43 * BLOCK, 213 * BLOCK)]);

    // Quiet prints nothing; a second run finds the same blocks free.
    let out = run(
        "thin_trim",
        &[
            "-q",
            "--metadata-dev",
            p.meta.to_str().unwrap(),
            "--data-dev",
            p.data.to_str().unwrap(),
        ],
    );
    assert!(out.status.success());
    assert!(out.stdout.is_empty() && out.stderr.is_empty());
    assert_trimmed(&p);
}

#[test]
fn trim_discards_free_runs_between_used_blocks() {
    // A generated pool with scattered free blocks: several runs.
    let dir = tempfile::tempdir().unwrap();
    let meta = dir.path().join("meta.img");
    std::fs::File::create(&meta)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let out = run(
        "thin_generate_metadata",
        &[
            "-o",
            meta.to_str().unwrap(),
            "--origins",
            "2",
            "--segments",
            "1",
            "--snaps",
            "1",
            "--fill",
            "1",
            "--writes",
            "3",
            "--headroom",
            "2",
            "--seed",
            "7",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let xml = String::from_utf8(run("thin_dump", &[meta.to_str().unwrap()]).stdout).unwrap();
    let attr = |k: &str| -> u64 {
        let key = format!(" {k}=\"");
        let i = xml.find(&key).unwrap() + key.len();
        xml[i..].split('"').next().unwrap().parse().unwrap()
    };
    let (bb, nr) = (
        attr("data_block_size") * 512,
        attr("nr_data_blocks") as usize,
    );
    let mut used = vec![false; nr];
    for line in xml.lines() {
        let num = |k: &str| -> Option<u64> {
            let key = format!(" {k}=\"");
            let i = line.find(&key)? + key.len();
            line[i..].split('"').next()?.parse().ok()
        };
        if let Some(d) = num("data_block") {
            used[d as usize] = true;
        } else if let (Some(b), Some(n)) = (num("data_begin"), num("length")) {
            (b..b + n).for_each(|d| used[d as usize] = true);
        }
    }
    let nr_used = used.iter().filter(|&&u| u).count();
    assert!(nr_used > 50 && nr_used < nr - 50, "{nr_used} used");
    // A sparse data file: each block's first 4 KiB stamped with its number.
    let data = dir.path().join("data.img");
    let f = std::fs::File::create(&data).unwrap();
    f.set_len(nr as u64 * bb).unwrap();
    for b in 0..nr as u64 {
        f.write_all_at(&[(b as u8) | 1; 4096], b * bb).unwrap();
    }
    drop(f);
    let out = run(
        "thin_trim",
        &[
            "--metadata-dev",
            meta.to_str().unwrap(),
            "--data-dev",
            data.to_str().unwrap(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = std::fs::File::open(&data).unwrap();
    let mut runs = 0;
    let mut head = [0u8; 4096];
    for b in 0..nr {
        f.read_exact_at(&mut head, b as u64 * bb).unwrap();
        if used[b] {
            assert!(head.iter().all(|&x| x == (b as u8) | 1), "used block {b}");
        } else {
            assert!(head.iter().all(|&x| x == 0), "free block {b}");
            if b == 0 || used[b - 1] {
                runs += 1;
            }
        }
    }
    assert!(runs > 1, "only {runs} free run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "discarded {} free data blocks in {runs} ranges",
            nr - nr_used
        )),
        "{stdout}"
    );
}

#[test]
fn trim_refuses_damaged_metadata_and_discards_nothing() {
    let p = pool();
    // Zero the device details tree's root (superblock offset 328).
    let mut root = [0u8; 8];
    std::fs::File::open(&p.meta)
        .unwrap()
        .read_exact_at(&mut root, 328)
        .unwrap();
    let root = u64::from_le_bytes(root);
    open_rw(&p.meta)
        .write_all_at(&[0u8; 4096], root * 4096)
        .unwrap();
    let out = run(
        "thin_trim",
        &[
            "--metadata-dev",
            p.meta.to_str().unwrap(),
            "--data-dev",
            p.data.to_str().unwrap(),
        ],
    );
    assert_eq!(out.status.code(), Some(65));
    assert_one_line_error(&out, "damaged metadata");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing was discarded"));
    assert_eq!(std::fs::read(&p.data).unwrap(), p.data_before);

    // needs_check set: refused as well.
    let p = pool();
    let out = run("thin_check", &[p.meta.to_str().unwrap()]);
    assert!(out.status.success());
    let mut sb = vec![0u8; 4096];
    let f = open_rw(&p.meta);
    f.read_exact_at(&mut sb, 0).unwrap();
    set_flags(&mut sb, NEEDS_CHECK_FLAG);
    f.write_all_at(&sb, 0).unwrap();
    drop(f);
    let out = run(
        "thin_trim",
        &[
            "--metadata-dev",
            p.meta.to_str().unwrap(),
            "--data-dev",
            p.data.to_str().unwrap(),
        ],
    );
    assert_eq!(
        out.status.code(),
        Some(65),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs_check"));
    assert_eq!(std::fs::read(&p.data).unwrap(), p.data_before);
}

#[test]
fn trim_refuses_wrong_arguments_and_devices() {
    let p = pool();
    let (m, d) = (p.meta.to_str().unwrap(), p.data.to_str().unwrap());
    let small = p.data.with_file_name("small.img");
    std::fs::write(&small, &p.data_before[..8 << 20]).unwrap();
    for (args, code) in [
        (vec!["--metadata-dev", m], 64),
        (vec!["--data-dev", d], 64),
        (vec!["--metadata-dev", m, "--data-dev", m], 64),
        (
            vec!["--metadata-dev", m, "--data-dev", small.to_str().unwrap()],
            64,
        ),
        (vec!["--metadata-dev", "/nonexistent", "--data-dev", d], 66),
        (vec!["--metadata-dev", m, "--data-dev", "/nonexistent"], 66),
    ] {
        let out = run("thin_trim", &args);
        assert_eq!(out.status.code(), Some(code), "{args:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
    }
    assert_eq!(std::fs::read(&p.data).unwrap(), p.data_before);
    assert_eq!(
        std::fs::read(&small).unwrap(),
        p.data_before[..8 << 20].to_vec()
    );
    // --pool-inactive (thin-provisioning-tools 0.x) is accepted.
    let out = run(
        "thin_trim",
        &[
            "--pool-inactive",
            "-q",
            "--metadata-dev",
            m,
            "--data-dev",
            d,
        ],
    );
    assert!(out.status.success());
    assert_trimmed(&p);
}

#[test]
fn trim_discards_on_a_loop_device() {
    let p = pool();
    let Some(dev) = loop_device_rw(&p.data) else {
        eprintln!("no loop devices here: thin_trim block-device test skipped");
        return;
    };
    let out = run(
        "thin_trim",
        &[
            "--metadata-dev",
            p.meta.to_str().unwrap(),
            "--data-dev",
            &dev.0,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    drop(dev);
    // The loop driver turns BLKDISCARD into holes in its backing file.
    assert_trimmed(&p);
    assert_eq!(holes(&p.data), vec![(43 * BLOCK, 213 * BLOCK)]);

    // A data device held open exclusively (an active pool) is refused.
    let p = pool();
    let Some(dev) = loop_device_rw(&p.data) else {
        return;
    };
    let _held = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_EXCL)
            .open(&dev.0)
            .unwrap()
    };
    let out = run(
        "thin_trim",
        &[
            "--metadata-dev",
            p.meta.to_str().unwrap(),
            "--data-dev",
            &dev.0,
        ],
    );
    assert_eq!(out.status.code(), Some(75));
    drop(dev);
    assert_eq!(std::fs::read(&p.data).unwrap(), p.data_before);
}

#[test]
fn migrate_checks_its_arguments_and_source() {
    let p = pool();
    let d = p.data.to_str().unwrap();
    let dest = p.data.with_file_name("dest.bin");
    let dest_s = dest.to_str().unwrap();
    for (args, code, msg) in [
        (vec![], 64, "You must specify a source"),
        (vec!["--dest-file", dest_s], 64, "You must specify a source"),
        (vec!["--source-dev", d], 64, "You must specify a dest"),
        (
            vec!["--source-dev", d, "--dest-file", dest_s, "--dest-dev", d],
            64,
            "exclude each other",
        ),
        (
            vec![
                "--source-dev",
                d,
                "--dest-file",
                dest_s,
                "--buffer-size-meg",
                "0",
            ],
            64,
            "--buffer-size-meg",
        ),
        (
            vec![
                "--source-dev",
                d,
                "--dest-file",
                dest_s,
                "--buffer-size-meg",
                "x",
            ],
            64,
            "invalid value",
        ),
        (
            vec!["--source-dev", "/nonexistent", "--dest-file", dest_s],
            66,
            "no such file",
        ),
        // A regular file is not a thin device.
        (
            vec!["--source-dev", d, "--dest-file", dest_s],
            66,
            "Not a block device",
        ),
    ] {
        let out = run("thin_migrate", &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
        assert!(!dest.exists(), "{args:?} created the destination");
    }
    // A block device that is not a device-mapper thin device.
    if let Some(dev) = loop_device_rw(&p.data) {
        let out = run(
            "thin_migrate",
            &["--source-dev", &dev.0, "--dest-file", dest_s],
        );
        assert_eq!(out.status.code(), Some(66));
        assert_one_line_error(&out, "loop device as the source");
        assert!(!dest.exists());
    }
    assert_eq!(
        format!("{:x}", Sha256::digest(std::fs::read(&p.data).unwrap())),
        format!("{:x}", Sha256::digest(&p.data_before))
    );
}
