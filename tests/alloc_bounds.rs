//! No count in the input sizes an allocation by itself: inputs that claim
//! huge pools (superblock space-map sizes, XML `nr_data_blocks`, the
//! `--nr-data-blocks` override) are refused or handled within what the
//! devices can hold. Every tool runs with its address space limited to
//! 2 GiB, so an allocation beyond that aborts and fails the test.

mod common;

use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output};

use common::*;
use thinmeta::pdata::checksum::{self, BlockKind};
use thinmeta::pdata::BLOCK_SIZE;

const LIMIT: u64 = 2 << 30;

/// `thinmeta TOOL args` with RLIMIT_AS = 2 GiB.
fn run_limited(tool: &str, args: &[&str]) -> Output {
    let mut c = Command::new(bin());
    c.arg(tool).args(args);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs in the child.
    unsafe {
        c.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: LIMIT,
                rlim_max: LIMIT,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c.output().unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn err(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Exited (no signal: an allocation failure aborts), never 2 or 70.
fn no_abort(out: &Output, what: &str) {
    let code = out.status.code();
    assert!(code.is_some(), "{what}: killed by a signal: {}", err(out));
    assert!(
        code != Some(2) && code != Some(70),
        "{what}: exit {code:?}: {}",
        err(out)
    );
    assert!(!err(out).contains("panicked"), "{what}: {}", err(out));
}

/// kernel-small's metadata with the superblock's u64 at `offset` set to
/// `value` and the checksum resealed (a writer bug, not bit rot).
fn resealed(dir: &Path, name: &str, offset: usize, value: u64) -> std::path::PathBuf {
    let p = unpack(&fixture_dir().join("meta.img.gz"), dir, name);
    let f = open_rw(&p);
    let mut b = vec![0u8; BLOCK_SIZE];
    f.read_exact_at(&mut b, 0).unwrap();
    b[offset..offset + 8].copy_from_slice(&value.to_le_bytes());
    checksum::seal(&mut b, BlockKind::ThinSuperblock);
    f.write_all_at(&b, 0).unwrap();
    p
}

fn zeroed(dir: &Path, name: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
    p
}

fn all_zero(p: &Path) -> bool {
    std::fs::read(p).unwrap().iter().all(|&b| b == 0)
}

/// thin_restore and thin_repair counted the data blocks of whatever pool
/// size the input claimed: 2^40 blocks aborted allocating 256 GiB. The
/// data space map's bitmaps must fit the output, so that is refused first.
#[test]
fn a_pool_whose_data_space_map_cannot_fit_the_output_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let meta = unpack(&fixture_dir().join("meta.img.gz"), d, "meta.img");
    let xml = String::from_utf8(run("thin_dump", &[s(&meta)]).stdout).unwrap();
    assert!(xml.contains("nr_data_blocks=\"256\""));
    for nr in ["1099511627776", "18446744073709551615", "16711681"] {
        let p = d.join(format!("{nr}.xml"));
        std::fs::write(
            &p,
            xml.replace(
                "nr_data_blocks=\"256\"",
                &format!("nr_data_blocks=\"{nr}\""),
            ),
        )
        .unwrap();
        let out_img = zeroed(d, "out.img");
        let out = run_limited("thin_restore", &["-i", s(&p), "-o", s(&out_img)]);
        no_abort(&out, nr);
        assert_eq!(out.status.code(), Some(66), "{nr}: {}", err(&out));
        assert_one_line_error(&out, nr);
        assert!(err(&out).contains("too small"), "{}", err(&out));
        assert!(err(&out).contains(s(&out_img)), "{}", err(&out));
        assert!(all_zero(&out_img), "{nr}: something was written");
    }
    // A pool whose 62 bitmaps fit beside its trees: restored.
    let p = d.join("fits.xml");
    std::fs::write(
        &p,
        xml.replace("nr_data_blocks=\"256\"", "nr_data_blocks=\"1000000\""),
    )
    .unwrap();
    let out_img = zeroed(d, "out.img");
    let out = run_limited("thin_restore", &["-i", s(&p), "-o", s(&out_img)]);
    assert!(out.status.success(), "{}", err(&out));
    assert!(run("thin_check", &[s(&out_img)]).status.success());

    // thin_repair of a superblock claiming 2^40 data blocks, and the
    // override.
    let big = resealed(d, "big.img", 64, 1 << 40);
    let out_img = zeroed(d, "out.img");
    let out = run_limited("thin_repair", &["-i", s(&big), "-o", s(&out_img)]);
    no_abort(&out, "thin_repair of 2^40 data blocks");
    assert_eq!(out.status.code(), Some(66), "{}", err(&out));
    assert!(all_zero(&out_img));
    let out = run_limited(
        "thin_repair",
        &[
            "-i",
            s(&meta),
            "-o",
            s(&out_img),
            "--nr-data-blocks",
            "1000000000000000000",
        ],
    );
    no_abort(&out, "thin_repair --nr-data-blocks 10^18");
    assert_eq!(out.status.code(), Some(66), "{}", err(&out));
    assert!(all_zero(&out_img));
}

/// Every tool on superblocks claiming huge space maps (data: 2^40 blocks;
/// metadata: 2^62 blocks): one-line errors or bounded work, never an abort.
#[test]
fn huge_space_map_sizes_never_size_an_allocation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = unpack(&fixture_dir().join("data.img.gz"), d, "data.img");
    let origin = d.join("origin.img");
    std::fs::write(&origin, vec![0u8; 1 << 20]).unwrap();
    for (what, offset, value) in [
        ("data space map of 2^40 blocks", 64, 1u64 << 40),
        ("data space map of 2^64-1 blocks", 64, u64::MAX),
        ("metadata space map of 2^62 blocks", 192, 1 << 62),
    ] {
        let m = resealed(d, "m.img", offset, value);
        let out_img = zeroed(d, "out.img");
        let (m, o, dt, og) = (s(&m), s(&out_img), s(&data), s(&origin));
        let pack = d.join("p.pack");
        let pk = s(&pack);
        for (tool, args) in [
            ("thin_check", vec![m]),
            ("thin_check", vec!["--auto-repair", m]),
            ("thin_dump", vec![m]),
            ("thin_dump", vec!["--repair", m]),
            ("thin_dump", vec!["-m", m]),
            ("thin_ls", vec![m]),
            ("thin_delta", vec!["--snap1", "1", "--snap2", "2", m]),
            ("thin_rmap", vec!["--region", "0..256", m]),
            ("thin_metadata_pack", vec!["-f", "-i", m, "-o", pk]),
            ("thin_repair", vec!["-i", m, "-o", o]),
            ("thin_message", vec![m, "create_thin", "9"]),
            ("thin_trim", vec!["--metadata-dev", m, "--data-dev", dt]),
            (
                "thin_merge",
                vec!["--metadata", m, "--dev-id", "2", "--into-thin", "1"],
            ),
            (
                "thin_merge",
                vec![
                    "--metadata",
                    m,
                    "--data",
                    dt,
                    "--dev-id",
                    "1",
                    "--origin",
                    og,
                ],
            ),
            (
                "thin_extract",
                vec!["--metadata", m, "--data", dt, "--dev-id", "1", "-o", o],
            ),
            (
                "thin_shrink",
                vec![
                    "--binary",
                    "-i",
                    m,
                    "-o",
                    o,
                    "--data",
                    dt,
                    "--nr-blocks",
                    "10",
                ],
            ),
        ] {
            let out = run_limited(tool, &args);
            no_abort(&out, &format!("{tool} {args:?} on a {what}"));
        }
    }
}
