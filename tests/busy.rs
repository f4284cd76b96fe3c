//! Every writer refuses a device that another process holds, for each
//! device it writes (and the inputs it reads exclusively): exit 75, one line
//! naming the device, nothing written. Once released the same command
//! succeeds, so the refusal was the hold's doing.
//!
//! Held two ways: a regular file locked with `flock(LOCK_EX)` (as another
//! thinmeta writer holds it), and a loop device opened `O_EXCL` (as the
//! kernel holds a live pool's devices; skipped with a note where loop
//! devices cannot be set up).

mod common;

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use thinmeta::pdata::BLOCK_SIZE;
use thinmeta::thin::superblock::{set_flags, NEEDS_CHECK_FLAG};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

const SNAP_MAGIC: u32 = 0x7041_6e53;

/// A dm-snapshot COW store of 512-byte chunks with two exceptions.
fn cow_store() -> Vec<u8> {
    let chunk = 512;
    let mut b = vec![0u8; 16 * chunk];
    for (i, v) in [SNAP_MAGIC, 1, 1, 1].iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    for (i, (old, new)) in [(0u64, 2u64), (5, 3)].iter().enumerate() {
        let off = chunk + i * 16;
        b[off..off + 8].copy_from_slice(&old.to_le_bytes());
        b[off + 8..off + 16].copy_from_slice(&new.to_le_bytes());
    }
    for c in 2..4 {
        b[c * chunk..(c + 1) * chunk].fill(c as u8);
    }
    b
}

/// The files every case starts from, made once and copied per case.
struct Templates {
    _dir: tempfile::TempDir,
    dir: PathBuf,
}

const FILES: [&str; 10] = [
    "meta",
    "flagged",
    "plain",
    "data",
    "xml",
    "pack",
    "out",
    "cow",
    "origin",
    "extorigin",
];

fn templates() -> Templates {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let meta = unpack(&fixture_dir().join("meta.img.gz"), &d, "meta");
    unpack(&fixture_dir().join("data.img.gz"), &d, "data");
    let flagged = d.join("flagged");
    std::fs::copy(&meta, &flagged).unwrap();
    let f = open_rw(&flagged);
    let mut b = vec![0u8; BLOCK_SIZE];
    f.read_exact_at(&mut b, 0).unwrap();
    set_flags(&mut b, NEEDS_CHECK_FLAG);
    f.write_all_at(&b, 0).unwrap();
    ok(
        &run("thin_dump", &[s(&meta), "-o", s(&d.join("xml"))]),
        "dump",
    );
    for name in ["plain", "out"] {
        std::fs::File::create(d.join(name))
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
    }
    ok(
        &run(
            "thin_restore",
            &["-i", s(&d.join("xml")), "-o", s(&d.join("plain"))],
        ),
        "restore",
    );
    ok(
        &run(
            "thin_metadata_pack",
            &["-i", s(&meta), "-o", s(&d.join("pack"))],
        ),
        "pack",
    );
    std::fs::write(d.join("cow"), cow_store()).unwrap();
    std::fs::write(d.join("origin"), vec![0x5au8; 8 * 512]).unwrap();
    std::fs::write(d.join("extorigin"), vec![7u8; 1 << 20]).unwrap();
    Templates { _dir: dir, dir: d }
}

/// A writer: its arguments (`{name}` stands for the case's copy of template
/// `name`) and the devices to hold, one at a time.
struct Case {
    tool: &'static str,
    args: &'static [&'static str],
    held: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        tool: "thin_restore",
        args: &["-i", "{xml}", "-o", "{out}"],
        held: &["out"],
    },
    Case {
        tool: "thin_repair",
        args: &["-i", "{meta}", "-o", "{out}"],
        held: &["out", "meta"],
    },
    Case {
        tool: "thin_check",
        args: &["--auto-repair", "{meta}"],
        held: &["meta"],
    },
    Case {
        tool: "thin_check",
        args: &["--clear-needs-check-flag", "{flagged}"],
        held: &["flagged"],
    },
    Case {
        tool: "thin_message",
        args: &["{meta}", "create_thin", "9"],
        held: &["meta"],
    },
    Case {
        tool: "thin_message",
        args: &["{plain}", "reserve_metadata_snap"],
        held: &["plain"],
    },
    Case {
        tool: "thin_merge",
        args: &["--metadata", "{meta}", "--dev-id", "2", "--into-thin", "1"],
        held: &["meta"],
    },
    Case {
        tool: "thin_merge",
        args: &[
            "--metadata",
            "{meta}",
            "--data",
            "{data}",
            "--dev-id",
            "1",
            "--origin",
            "{extorigin}",
        ],
        held: &["meta", "data", "extorigin"],
    },
    Case {
        tool: "snap_merge",
        args: &["--origin", "{origin}", "--cow", "{cow}"],
        held: &["cow", "origin"],
    },
    Case {
        tool: "thin_shrink",
        args: &[
            "--binary",
            "-i",
            "{plain}",
            "-o",
            "{out}",
            "--data",
            "{data}",
            "--nr-blocks",
            "256",
        ],
        held: &["out", "data", "plain"],
    },
    Case {
        tool: "thin_shrink",
        args: &[
            "-i",
            "{xml}",
            "-o",
            "{dir}/shrunk.xml",
            "--data",
            "{data}",
            "--nr-blocks",
            "256",
        ],
        held: &["data"],
    },
    Case {
        tool: "thin_metadata_unpack",
        args: &["-i", "{pack}", "-o", "{out}"],
        held: &["out"],
    },
    Case {
        tool: "thin_generate_metadata",
        args: &["-o", "{out}", "--segments", "4"],
        held: &["out"],
    },
    Case {
        tool: "thin_trim",
        args: &["--metadata-dev", "{meta}", "--data-dev", "{data}"],
        held: &["meta", "data"],
    },
];

/// Every file's name and bytes (compared directly: hashing in a debug
/// build is slower than the tools).
fn contents(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

/// Hold `path`: a block device opened `O_EXCL`, a file locked `LOCK_EX`.
fn hold(path: &str) -> std::fs::File {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(if path.starts_with("/dev/") {
            libc::O_EXCL
        } else {
            0
        })
        .open(path)
        .unwrap();
    if !path.starts_with("/dev/") {
        // SAFETY: flock on a descriptor we own.
        assert_eq!(
            unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) },
            0
        );
    }
    f
}

/// Run `case` with `held` held, as a file or (`on_loop`) a loop device:
/// refused with 75, one line naming it, nothing written; then released: it
/// succeeds. False when loop devices are unavailable.
fn refused_while_held(t: &Templates, case: &Case, held: &str, on_loop: bool) -> bool {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for name in FILES {
        std::fs::copy(t.dir.join(name), d.join(name)).unwrap();
    }
    let lo = if on_loop {
        match loop_device_rw(&d.join(held)) {
            Some(l) => Some(l),
            None => return false,
        }
    } else {
        None
    };
    let held_path = match &lo {
        Some(l) => l.0.clone(),
        None => s(&d.join(held)).to_string(),
    };
    let args: Vec<String> = case
        .args
        .iter()
        .map(|a| {
            let mut a = a.replace("{dir}", s(d));
            for name in FILES {
                let path = if name == held {
                    held_path.clone()
                } else {
                    s(&d.join(name)).to_string()
                };
                a = a.replace(&format!("{{{name}}}"), &path);
            }
            a
        })
        .collect();
    let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
    let what = format!(
        "{} {args:?} with {held} held ({})",
        case.tool,
        if on_loop { "loop device" } else { "file" }
    );

    let before = contents(d);
    {
        let _h = hold(&held_path);
        let out = run(case.tool, &a);
        assert_eq!(
            out.status.code(),
            Some(75),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_one_line_error(&out, &what);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("in use"), "{what}: {err}");
        assert!(err.contains(&held_path), "{what}: names the device: {err}");
    }
    assert!(contents(d) == before, "{what}: something was written");
    assert!(!d.join("shrunk.xml").exists(), "{what}: output created");
    // Released, the same command works.
    ok(&run(case.tool, &a), &format!("{what}, released"));
    true
}

/// The two tests run one at a time: a child one test forks inherits the
/// other's held descriptor (and so its flock or O_EXCL claim) until it
/// execs, which would make a "released" device look busy for a moment.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn every_writer_refuses_a_locked_file() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = templates();
    for case in CASES {
        for held in case.held {
            refused_while_held(&t, case, held, false);
        }
    }
}

#[test]
fn every_writer_refuses_a_block_device_held_open() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t = templates();
    for case in CASES {
        for held in case.held {
            if !refused_while_held(&t, case, held, true) {
                eprintln!("note: no loop devices here: held block device test skipped");
                return;
            }
        }
    }
}
