//! Helpers for the integration tests: run the real binary, find shared test data.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_thinmeta")
}

/// Run `thinmeta TOOL args...`.
pub fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(bin())
        .arg(tool)
        .args(args)
        .output()
        .expect("run thinmeta")
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `../shared/testdata` when it exists. With THINMETA_REQUIRE_FIXTURES=1
/// (set by .ci/run) its absence fails the test instead of skipping it.
pub fn shared_testdata() -> Option<PathBuf> {
    let p = repo().join("../shared/testdata");
    if !p.is_dir() && std::env::var_os("THINMETA_REQUIRE_FIXTURES").is_some_and(|v| v == "1") {
        panic!("{} is missing and THINMETA_REQUIRE_FIXTURES=1", p.display());
    }
    p.is_dir().then_some(p)
}

pub fn gunzip(path: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// Unpack `gz` into `dir` as `name`, returning the path.
pub fn unpack(gz: &Path, dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, gunzip(gz)).unwrap();
    p
}

/// Open an image read-write (tests damage copies of fixtures in place).
pub fn open_rw(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

pub fn fixture_dir() -> PathBuf {
    repo().join("tests/data/kernel-small")
}

/// A one-line message on stderr: no panic text, no multi-line dumps.
pub fn assert_one_line_error(out: &Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{what}: panic: {err}");
    assert!(!err.trim().is_empty(), "{what}: no error message");
    let code = out.status.code().expect("exited normally");
    assert!(
        code != 0 && code != 2 && code != 70,
        "{what}: exit {code}: {err}"
    );
}

/// A loop device over an image, detached when dropped.
pub struct Loop(pub String);

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

fn losetup(img: &Path, extra: &[&str]) -> Option<Loop> {
    match Command::new("losetup")
        .args(extra)
        .args(["-f", "--show"])
        .arg(img)
        .output()
    {
        Ok(o) if o.status.success() => Some(Loop(
            String::from_utf8(o.stdout).unwrap().trim().to_string(),
        )),
        _ => None,
    }
}

/// `img` as a writable loop device (None where loop devices are missing,
/// or we are not root).
pub fn loop_device_rw(img: &Path) -> Option<Loop> {
    losetup(img, &[])
}

/// `img` as a read-only loop device (`losetup -r`).
pub fn loop_device_ro(img: &Path) -> Option<Loop> {
    losetup(img, &["-r"])
}

/// Run `open` until it stops failing with `Busy`, for up to two seconds.
/// A child process another test thread forks inherits this process's file
/// descriptors until it execs, and with them the advisory `flock` an
/// exclusive open holds: reopening the same image right after closing it can
/// see that lock for the few microseconds before the child's exec.
pub fn retry_busy<T>(
    mut open: impl FnMut() -> Result<T, thinmeta::pdata::io::OpenError>,
) -> Result<T, thinmeta::pdata::io::OpenError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match open() {
            Err(thinmeta::pdata::io::OpenError::Busy) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            r => return r,
        }
    }
}
