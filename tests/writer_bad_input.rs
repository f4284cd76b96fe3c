//! Writers given damaged or invalid input: the documented exit code, a
//! message naming the device and the block (where there is one) on one
//! printable line, and nothing written to any device.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use thinmeta::pdata::BLOCK_SIZE;
use thinmeta::thin::superblock::{set_flags, NEEDS_CHECK_FLAG};

fn err(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// kernel-small's metadata (its data mapping tree's top node is block 52)
/// and data, and copies of the metadata damaged: `dmg` (block 52 bit-rotted),
/// `nosb` (superblock zeroed), `dmg-flagged` (block 52 bit-rotted and the
/// needs_check flag set).
struct Fixture {
    _dir: tempfile::TempDir,
    d: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let meta = unpack(&fixture_dir().join("meta.img.gz"), &d, "meta.img");
    unpack(&fixture_dir().join("data.img.gz"), &d, "data.img");
    let bytes = std::fs::read(&meta).unwrap();
    let mut dmg = bytes.clone();
    dmg[52 * BLOCK_SIZE + 100] ^= 0xff;
    std::fs::write(d.join("dmg"), &dmg).unwrap();
    let mut nosb = bytes.clone();
    nosb[..BLOCK_SIZE].fill(0);
    std::fs::write(d.join("nosb"), &nosb).unwrap();
    std::fs::write(d.join("dmg-flagged"), &dmg).unwrap();
    let f = open_rw(&d.join("dmg-flagged"));
    let mut b = vec![0u8; BLOCK_SIZE];
    f.read_exact_at(&mut b, 0).unwrap();
    set_flags(&mut b, NEEDS_CHECK_FLAG);
    f.write_all_at(&b, 0).unwrap();
    std::fs::write(d.join("zero"), vec![0u8; 4 << 20]).unwrap();
    std::fs::write(d.join("out"), vec![0u8; 4 << 20]).unwrap();
    std::fs::write(d.join("origin"), vec![0x5au8; 1 << 20]).unwrap();
    std::fs::write(d.join("tiny"), vec![0u8; 2 * BLOCK_SIZE]).unwrap();
    let gz = std::fs::read(fixture_dir().join("meta.img.gz")).unwrap();
    std::fs::write(d.join("truncated.gz"), &gz[..5000]).unwrap();
    std::fs::write(
        d.join("bad.xml"),
        "<superblock uuid=\"\" time=\"1\" transaction=\"1\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"100\">\n  <device dev_id=\"1\" mapped_blocks=\"1\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n    <single_mapping origin_block=\"0\" data_block=\"100\" time=\"0\"/>\n  </device>\n</superblock>\n",
    )
    .unwrap();
    // A COW store whose one exception points past its end.
    let mut cow = vec![0u8; 16 * 512];
    for (i, v) in [0x7041_6e53u32, 1, 1, 1].iter().enumerate() {
        cow[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    cow[512 + 8..512 + 16].copy_from_slice(&99u64.to_le_bytes());
    std::fs::write(d.join("cow"), &cow).unwrap();
    Fixture { _dir: dir, d }
}

fn contents(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn writers_refuse_damaged_input_in_one_line_and_write_nothing() {
    let f = fixture();
    // Paths live as long as the test (the directory does).
    let p = |n: &str| -> &'static str {
        Box::leak(f.d.join(n).to_str().unwrap().to_string().into_boxed_str())
    };
    let (dmg, nosb, flagged, data, out) = (
        p("dmg"),
        p("nosb"),
        p("dmg-flagged"),
        p("data.img"),
        p("out"),
    );
    // (tool, args, exit code, the device named, what else the message names)
    let cases: Vec<(&str, Vec<&str>, i32, &str, &str)> = vec![
        (
            "thin_message",
            vec![dmg, "create_thin", "9"],
            65,
            dmg,
            "block 52",
        ),
        (
            "thin_message",
            vec![nosb, "delete", "1"],
            65,
            nosb,
            "block 0",
        ),
        (
            "thin_merge",
            vec!["--metadata", dmg, "--dev-id", "2", "--into-thin", "1"],
            65,
            dmg,
            "block 52",
        ),
        (
            "thin_merge",
            vec![
                "--metadata",
                dmg,
                "--data",
                data,
                "--dev-id",
                "1",
                "--origin",
                p("origin"),
            ],
            65,
            dmg,
            "block 52",
        ),
        (
            "thin_shrink",
            vec![
                "--binary",
                "-i",
                nosb,
                "-o",
                out,
                "--data",
                data,
                "--nr-blocks",
                "100",
            ],
            65,
            nosb,
            "block 0",
        ),
        (
            "thin_shrink",
            vec![
                "-i",
                p("bad.xml"),
                "-o",
                p("new.xml"),
                "--data",
                data,
                "--nr-blocks",
                "50",
            ],
            65,
            p("bad.xml"),
            "line 3",
        ),
        (
            "thin_trim",
            vec!["--metadata-dev", dmg, "--data-dev", data],
            65,
            dmg,
            "block 52",
        ),
        (
            "thin_restore",
            vec!["-i", p("meta.img"), "-o", out],
            65,
            p("meta.img"),
            "binary thin metadata, not XML",
        ),
        (
            "thin_restore",
            vec!["-i", p("zero"), "-o", out],
            65,
            p("zero"),
            "line 1, column 1",
        ),
        (
            "thin_restore",
            vec!["-i", p("bad.xml"), "-o", out],
            65,
            p("bad.xml"),
            "line 3",
        ),
        (
            "thin_repair",
            vec!["-i", p("zero"), "-o", out],
            65,
            p("zero"),
            "no recoverable",
        ),
        (
            "thin_metadata_unpack",
            vec!["-f", "-i", p("truncated.gz"), "-o", out],
            74,
            p("truncated.gz"),
            "gzip",
        ),
        (
            "thin_metadata_unpack",
            vec!["-f", "-i", dmg, "-o", out],
            65,
            dmg,
            "",
        ),
        (
            "snap_merge",
            vec!["--origin", p("origin"), "--cow", p("cow")],
            65,
            p("cow"),
            "new 99",
        ),
        (
            "thin_generate_metadata",
            vec!["-o", p("tiny")],
            66,
            p("tiny"),
            "too small",
        ),
    ];
    let before = contents(&f.d);
    for (tool, args, code, device, names) in &cases {
        let what = format!("{tool} {args:?}");
        let o = run(tool, args);
        assert_eq!(o.status.code(), Some(*code), "{what}: {}", err(&o));
        assert_one_line_error(&o, &what);
        let e = err(&o);
        assert_eq!(e.trim_end().lines().count(), 1, "{what}: one line: {e}");
        assert!(
            !e.trim_end().chars().any(|c| c.is_control()),
            "{what}: printable: {e:?}"
        );
        assert!(e.contains(device), "{what}: names {device}: {e}");
        assert!(e.contains(names), "{what}: names {names}: {e}");
        assert!(contents(&f.d) == before, "{what}: something was written");
    }
    assert!(!f.d.join("new.xml").exists());

    // thin_check's writing modes report the damage (a report: one line a
    // problem, each naming the device) and write nothing.
    for args in [
        vec!["--auto-repair", dmg],
        vec!["--clear-needs-check-flag", flagged],
    ] {
        let o = run("thin_check", &args);
        assert_eq!(o.status.code(), Some(65), "{args:?}: {}", err(&o));
        let e = err(&o);
        assert!(e.contains("block 52"), "{args:?}: {e}");
        assert!(
            e.lines().all(|l| l.contains(args[1])),
            "{args:?}: every line names the device: {e}"
        );
        assert!(contents(&f.d) == before, "{args:?}: something was written");
    }
}
