//! thin_merge and thin_extract on pools the kernel wrote: merges into an
//! external origin give exactly what the kernel read through the thin
//! device (also after interruptions), extracts give every device's content,
//! the metadata-level merge of a snapshot into its origin passes thin_check
//! and moves the snapshot's mappings, and refusals write nothing.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use sha2::{Digest, Sha256};

fn sha(path: &Path) -> String {
    hex(&Sha256::digest(std::fs::read(path).unwrap()))
}

fn sha_bytes(b: &[u8]) -> String {
    hex(&Sha256::digest(b))
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// `LABEL -> (bytes, sha256)` of an `expect` file.
fn expect(path: &Path) -> BTreeMap<String, (u64, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (label, sectors, sha) = (w.next()?, w.next()?, w.next()?);
            Some((
                label.to_string(),
                (sectors.parse::<u64>().unwrap() * 512, sha.to_string()),
            ))
        })
        .collect()
}

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

fn code(out: &Output, want: i32, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(want),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_one_line_error(out, what);
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

//------------------------------------------------------------------------------
// ext-origin (../shared/testdata/kernel/ext-origin)

struct ExtOrigin {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    meta: PathBuf,
    data: PathBuf,
    origin: PathBuf,
    expect: BTreeMap<String, (u64, String)>,
}

impl ExtOrigin {
    fn new() -> Option<ExtOrigin> {
        let Some(td) = shared_testdata() else {
            eprintln!("../shared/testdata is absent: ext-origin test skipped");
            return None;
        };
        let src = td.join("kernel/ext-origin");
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().to_path_buf();
        Some(ExtOrigin {
            meta: unpack(&src.join("meta.img.gz"), &d, "meta.img"),
            data: unpack(&src.join("data.img.gz"), &d, "data.img"),
            origin: unpack(&src.join("origin.img.gz"), &d, "origin.img"),
            expect: expect(&src.join("ext-origin.results/expect")),
            dir: d,
            _dir: dir,
        })
    }

    /// A fresh copy of origin.img named `name`.
    fn copy(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::copy(&self.origin, &p).unwrap();
        p
    }

    fn merge(&self, id: u64, origin: &Path, extra: &[&str]) -> Output {
        let id = id.to_string();
        let mut args = vec![
            "--metadata",
            s(&self.meta),
            "--data",
            s(&self.data),
            "--dev-id",
            &id,
            "--origin",
            s(origin),
        ];
        args.extend_from_slice(extra);
        run("thin_merge", &args)
    }

    fn want(&self, label: &str) -> &(u64, String) {
        &self.expect[label]
    }
}

#[test]
fn merging_dev_1_and_2_into_the_external_origin_gives_what_the_kernel_read() {
    let Some(x) = ExtOrigin::new() else { return };
    assert_eq!(sha(&x.origin), x.want("origin.before").1);
    for id in [1u64, 2] {
        let o = x.copy(&format!("o{id}.img"));
        let out = x.merge(id, &o, &[]);
        ok(&out, &format!("merge {id}"));
        let (bytes, want) = x.want(&format!("final.thin{id}"));
        assert_eq!(std::fs::metadata(&o).unwrap().len(), *bytes);
        assert_eq!(&sha(&o), want, "merged dev {id}");
        assert!(stdout(&out).contains("copied"), "{}", stdout(&out));
        assert!(
            out.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Again: the same bytes (idempotent).
        ok(&x.merge(id, &o, &["-q"]), "merge again");
        assert_eq!(&sha(&o), want, "merged dev {id} twice");
    }
    // The inputs are only read.
    assert_eq!(sha(&x.origin), x.want("origin.before").1);
}

#[test]
fn dev_3_is_clipped_at_the_origins_end_and_says_so() {
    let Some(x) = ExtOrigin::new() else { return };
    let osize = std::fs::metadata(&x.origin).unwrap().len();
    let o = x.copy("o3.img");
    let out = x.merge(3, &o, &[]);
    ok(&out, "merge 3");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("1 mapped block of device 3") && err.contains("virtual block 1030"),
        "{err}"
    );
    assert!(err.contains(&format!("{}", 1031 * 65536)), "{err}");
    assert_eq!(std::fs::metadata(&o).unwrap().len(), osize, "not grown");
    // What it wrote: device 3's content up to the origin's end.
    let ext = x.dir.join("x3.img");
    ok(
        &run(
            "thin_extract",
            &[
                "--metadata",
                s(&x.meta),
                "--data",
                s(&x.data),
                "--dev-id",
                "3",
                "--origin",
                s(&x.origin),
                "--size",
                &osize.to_string(),
                "-o",
                s(&ext),
            ],
        ),
        "extract 3",
    );
    assert_eq!(sha(&o), sha(&ext));
    // Grown to the device's size, the merge is the whole device.
    let (bytes, want) = x.want("final.thin3").clone();
    let g = x.copy("g3.img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&g)
        .unwrap()
        .set_len(bytes)
        .unwrap();
    let out = x.merge(3, &g, &[]);
    ok(&out, "merge 3 into the grown origin");
    assert!(out.stderr.is_empty());
    assert_eq!(sha(&g), want);
}

#[test]
fn an_interrupted_merge_run_again_gives_the_same_bytes() {
    let Some(x) = ExtOrigin::new() else { return };
    let want = x.want("final.thin2").1.clone();
    // How many writes a whole merge takes.
    let probe = x.copy("probe.img");
    let out = x.merge(2, &probe, &[]);
    ok(&out, "probe");
    let text = stdout(&out);
    let writes: u64 = text
        .split(" in ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no write count in {text}"));
    assert!(writes >= 3, "{text}");
    let original = std::fs::read(&x.origin).unwrap();
    for k in 0..writes {
        let o = x.copy(&format!("int{k}.img"));
        let ks = k.to_string();
        let out = x.merge(2, &o, &["--fail-after-writes", &ks]);
        code(&out, 74, &format!("interrupted after {k} writes"));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("run the same command again"), "{err}");
        let partial = std::fs::read(&o).unwrap();
        if k == 0 {
            assert_eq!(partial, original, "nothing written before the first write");
        } else {
            assert_ne!(sha_bytes(&partial), want, "only partly merged after {k}");
        }
        // Interrupted again, later, then run to the end.
        if k + 2 < writes {
            let k2 = (k + 2).to_string();
            code(
                &x.merge(2, &o, &["--fail-after-writes", &k2]),
                74,
                "interrupted again",
            );
        }
        ok(&x.merge(2, &o, &[]), "rerun");
        assert_eq!(sha(&o), want, "interrupted after {k} writes, then rerun");
    }
    // A hook past the end changes nothing.
    let o = x.copy("late.img");
    ok(
        &x.merge(2, &o, &["--fail-after-writes", &writes.to_string()]),
        "hook past the last write",
    );
    assert_eq!(sha(&o), want);
}

#[test]
fn dry_run_says_what_it_would_copy_and_writes_nothing() {
    let Some(x) = ExtOrigin::new() else { return };
    let o = x.copy("dry.img");
    let before = std::fs::read(&o).unwrap();
    let out = x.merge(1, &o, &["--dry-run"]);
    ok(&out, "dry run");
    let text = stdout(&out);
    // dev 1: 0 (+1..3 consecutive), 10, 450-451, 700, 1000: 9 blocks in 5 runs.
    assert!(
        text.contains("would copy 5 runs, 9 blocks, 589824 bytes"),
        "{text}"
    );
    assert_eq!(std::fs::read(&o).unwrap(), before);
    let out = x.merge(3, &o, &["--dry-run"]);
    ok(&out, "dry run 3");
    assert!(stdout(&out).contains("would copy 1 run, 1 block, 65536 bytes"));
    assert!(String::from_utf8_lossy(&out.stderr).contains("would not be copied"));
    assert_eq!(std::fs::read(&o).unwrap(), before);
    // A dry run opens the origin read-only: a read-only file is fine.
    let mut perm = std::fs::metadata(&o).unwrap().permissions();
    perm.set_readonly(true);
    std::fs::set_permissions(&o, perm).unwrap();
    ok(
        &x.merge(2, &o, &["--dry-run", "-q"]),
        "dry run, read-only origin",
    );
    assert_eq!(std::fs::read(&o).unwrap(), before);
}

#[test]
fn delta_from_copies_only_what_differs() {
    let Some(x) = ExtOrigin::new() else { return };
    let o = x.copy("delta.img");
    ok(&x.merge(1, &o, &["-q"]), "merge 1");
    assert_eq!(sha(&o), x.want("final.thin1").1);
    let out = x.merge(2, &o, &["--delta-from", "1"]);
    ok(&out, "delta 1 -> 2");
    let text = stdout(&out);
    // dev 2 differs from dev 1 at 0 (1's COW after the snapshot), 5-6, 20.
    assert!(
        text.contains("copied 3 runs, 4 blocks, 262144 bytes"),
        "{text}"
    );
    assert!(text.contains("8 blocks the same"), "{text}");
    assert_eq!(sha(&o), x.want("final.thin2").1);
    // Same id twice: refused.
    code(
        &x.merge(2, &o, &["--delta-from", "2"]),
        64,
        "delta from itself",
    );
    code(
        &x.merge(2, &o, &["--delta-from", "9"]),
        64,
        "delta from nothing",
    );
}

#[test]
fn extract_with_the_external_origin_gives_every_device() {
    let Some(x) = ExtOrigin::new() else { return };
    for id in [1u64, 2, 3] {
        let (bytes, want) = x.want(&format!("final.thin{id}")).clone();
        let ids = id.to_string();
        let size = bytes.to_string();
        let args = [
            "--metadata",
            s(&x.meta),
            "--data",
            s(&x.data),
            "--dev-id",
            &ids,
            "--origin",
            s(&x.origin),
            "--size",
            &size,
        ];
        let out = run("thin_extract", &args);
        ok(&out, "extract to stdout");
        assert_eq!(out.stdout.len() as u64, bytes);
        assert_eq!(sha_bytes(&out.stdout), want, "stdout, dev {id}");
        let f = x.dir.join(format!("e{id}.img"));
        let mut a = args.to_vec();
        a.extend_from_slice(&["-o", s(&f)]);
        ok(&run("thin_extract", &a), "extract to a file");
        assert_eq!(sha(&f), want, "file, dev {id}");
    }
    // Without --size: the origin's size, or the highest mapped block's end
    // when that is larger (dev 3 maps virtual block 1030 of 64 KiB).
    let osize = std::fs::metadata(&x.origin).unwrap().len();
    for (id, size) in [(1, osize), (3, 1031 * 65536)] {
        let f = x.dir.join(format!("d{id}.img"));
        let ids = id.to_string();
        ok(
            &run(
                "thin_extract",
                &[
                    "--metadata",
                    s(&x.meta),
                    "--data",
                    s(&x.data),
                    "--dev-id",
                    &ids,
                    "--origin",
                    s(&x.origin),
                    "-o",
                    s(&f),
                ],
            ),
            "default size",
        );
        assert_eq!(std::fs::metadata(&f).unwrap().len(), size, "dev {id}");
    }
}

//------------------------------------------------------------------------------
// kernel-small (tests/data/kernel-small)

struct Small {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    meta: PathBuf,
    data: PathBuf,
    expect: BTreeMap<String, (u64, String)>,
}

fn small() -> Small {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    Small {
        meta: unpack(&fixture_dir().join("meta.img.gz"), &d, "meta.img"),
        data: unpack(&fixture_dir().join("data.img.gz"), &d, "data.img"),
        expect: expect(&fixture_dir().join("expect")),
        dir: d,
        _dir: dir,
    }
}

impl Small {
    fn extract(&self, meta: &Path, id: u64, bytes: u64, extra: &[&str]) -> Vec<u8> {
        let ids = id.to_string();
        let size = bytes.to_string();
        let mut args = vec![
            "--metadata",
            s(meta),
            "--data",
            s(&self.data),
            "--dev-id",
            &ids,
            "--size",
            &size,
        ];
        args.extend_from_slice(extra);
        let out = run("thin_extract", &args);
        ok(&out, &format!("extract {id}"));
        out.stdout
    }

    fn copy(&self, name: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::copy(&self.meta, &p).unwrap();
        p
    }
}

#[test]
fn extract_gives_every_kernel_small_device_live_and_in_the_metadata_snapshot() {
    let k = small();
    for (label, (bytes, want)) in &k.expect {
        let (snap, id) = match label.split_once(".thin") {
            Some(("final", id)) => (false, id),
            Some(("metasnap", id)) => (true, id),
            _ => continue,
        };
        let id: u64 = id.parse().unwrap();
        let extra: &[&str] = if snap { &["-m"] } else { &[] };
        let got = k.extract(&k.meta, id, *bytes, extra);
        assert_eq!(&sha_bytes(&got), want, "{label}");
        // To a file: the same bytes, sparse.
        if !snap {
            let f = k.dir.join(format!("x{id}.img"));
            let ids = id.to_string();
            let size = bytes.to_string();
            ok(
                &run(
                    "thin_extract",
                    &[
                        "--metadata",
                        s(&k.meta),
                        "--data",
                        s(&k.data),
                        "--dev-id",
                        &ids,
                        "--size",
                        &size,
                        "-o",
                        s(&f),
                    ],
                ),
                "extract to a file",
            );
            assert_eq!(&sha(&f), want, "{label} to a file");
            let md = std::fs::metadata(&f).unwrap();
            assert_eq!(md.len(), *bytes);
            assert!(
                md.blocks() * 512 < md.len(),
                "{label}: {} bytes allocated of {}: not sparse",
                md.blocks() * 512,
                md.len()
            );
        }
    }
    // The metadata is only read.
    assert_eq!(
        std::fs::read(&k.meta).unwrap(),
        gunzip(&fixture_dir().join("meta.img.gz"))
    );
}

#[test]
fn merges_read_the_metadata_snapshot_with_m() {
    let k = small();
    let (bytes, want1) = k.expect["metasnap.thin1"].clone();
    let merge = |o: &Path, id: &str, extra: &[&str]| {
        let mut a = vec![
            "-m",
            "--metadata",
            s(&k.meta),
            "--data",
            s(&k.data),
            "--dev-id",
            id,
            "--origin",
            s(o),
        ];
        a.extend_from_slice(extra);
        run("thin_merge", &a)
    };
    let full = k.dir.join("full.img");
    std::fs::write(&full, vec![0u8; bytes as usize]).unwrap();
    ok(&merge(&full, "1", &[]), "merge -m 1");
    assert_eq!(sha(&full), want1);
    let delta = k.dir.join("delta.img");
    std::fs::copy(&full, &delta).unwrap();
    // Snapshot 2 of the metadata snapshot: all of it, or what differs from 1.
    let with1 = k.dir.join("with1.img");
    std::fs::copy(&full, &with1).unwrap();
    ok(&merge(&full, "2", &[]), "merge -m 2");
    let out = merge(&delta, "2", &["--delta-from", "1"]);
    ok(&out, "merge -m 2 --delta-from 1");
    assert_eq!(sha(&delta), sha(&full), "delta merge == full merge");
    // Both are device 2 over the origin that holds device 1: device 1's
    // block 50 (written after the snapshot, not mapped by 2) stays, and is
    // reported.
    assert_eq!(
        std::fs::read(&full).unwrap(),
        k.extract(&k.meta, 2, bytes, &["-m", "--origin", s(&with1)])
    );
    assert_ne!(sha(&full), k.expect["metasnap.thin2"].1);
    assert!(
        stdout(&out).contains("1 block mapped only by device 1"),
        "{}",
        stdout(&out)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("virtual block 50"), "{err}");
}

#[test]
fn extract_refuses_what_it_cannot_do() {
    let k = small();
    let base = ["--metadata", s(&k.meta), "--data", s(&k.data)];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        run("thin_extract", &a)
    };
    code(&with(&["--dev-id", "9"]), 64, "missing device");
    let never = k.dir.join("never.img");
    code(
        &with(&["--dev-id", "9", "-o", s(&never)]),
        64,
        "missing device, to a file",
    );
    assert!(!never.exists(), "a failed extract leaves no new file");
    code(
        &with(&["--dev-id", "1", "-o", s(&k.meta)]),
        64,
        "output = metadata",
    );
    code(&with(&["--dev-id", "1", "--size", "x"]), 64, "bad size");
    let nometa = k.dir.join("none.img");
    code(
        &run(
            "thin_extract",
            &[
                "--metadata",
                s(&nometa),
                "--data",
                s(&k.data),
                "--dev-id",
                "1",
            ],
        ),
        66,
        "no metadata",
    );
    // A data device too small for the mappings.
    let short = k.dir.join("short.img");
    std::fs::write(&short, vec![0u8; 1 << 20]).unwrap();
    let out = run(
        "thin_extract",
        &[
            "--metadata",
            s(&k.meta),
            "--data",
            s(&short),
            "--dev-id",
            "1",
        ],
    );
    code(&out, 65, "short data device");
}

/// (virtual, data) pairs of device `id` in a dump (refs expanded), via the JSON dump.
fn mappings(meta: &Path, id: u64, snap: bool) -> Vec<(u64, u64)> {
    let ids = id.to_string();
    let mut args = vec!["-f", "json", "--dev-id", &ids];
    if snap {
        args.push("-m");
    }
    args.push(s(meta));
    let out = run("thin_dump", &args);
    ok(&out, "thin_dump");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut m = Vec::new();
    for d in v["devices"].as_array().unwrap() {
        for r in d["mappings"].as_array().unwrap() {
            let (o, db, n) = (
                r["origin_begin"].as_u64().unwrap(),
                r["data_begin"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
            );
            m.extend((0..n).map(|i| (o + i, db + i)));
        }
    }
    m
}

fn device_ids(meta: &Path) -> Vec<u64> {
    let out = run("thin_dump", &["-f", "json", "--skip-mappings", s(meta)]);
    ok(&out, "thin_dump --skip-mappings");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["dev_id"].as_u64().unwrap())
        .collect()
}

#[test]
fn merging_snapshot_2_into_origin_1_moves_its_mappings() {
    let k = small();
    let m = k.copy("merge.img");
    let snap_maps = mappings(&m, 2, false);
    let others: Vec<_> = [3, 4].iter().map(|&i| mappings(&m, i, false)).collect();
    let held = run("thin_dump", &["-m", s(&m)]).stdout;

    // Dry run: says it, writes nothing.
    let before = std::fs::read(&m).unwrap();
    let out = run(
        "thin_merge",
        &[
            "--metadata",
            s(&m),
            "--dev-id",
            "2",
            "--into-thin",
            "1",
            "--dry-run",
        ],
    );
    ok(&out, "dry run");
    assert!(stdout(&out).starts_with("would merge snapshot 2 into device 1"));
    assert_eq!(std::fs::read(&m).unwrap(), before);

    let out = run(
        "thin_merge",
        &["--metadata", s(&m), "--dev-id", "2", "--into-thin", "1"],
    );
    ok(&out, "merge 2 into 1");
    assert!(
        stdout(&out).contains("device 1 maps 26 blocks (was 27), device 2 removed"),
        "{}",
        stdout(&out)
    );
    ok(&run("thin_check", &[s(&m)]), "thin_check after the merge");
    assert_eq!(device_ids(&m), vec![1, 3, 4]);
    assert_eq!(
        mappings(&m, 1, false),
        snap_maps,
        "dev 1 has dev 2's mappings"
    );
    for (i, id) in [3u64, 4].iter().enumerate() {
        assert_eq!(mappings(&m, *id, false), others[i], "dev {id} unchanged");
    }
    let dump = stdout(&run("thin_dump", &["--dev-id", "1", s(&m)]));
    assert!(dump.contains("mapped_blocks=\"26\""), "{dump}");
    // The held metadata snapshot is untouched.
    assert_eq!(run("thin_dump", &["-m", s(&m)]).stdout, held);
    // Device 1 now reads as device 2 did; 3 and 4 as before.
    let (bytes, want) = &k.expect["final.thin2"];
    assert_eq!(&sha_bytes(&k.extract(&m, 1, *bytes, &[])), want);
    for id in [3u64, 4] {
        let (bytes, want) = &k.expect[&format!("final.thin{id}")];
        assert_eq!(&sha_bytes(&k.extract(&m, id, *bytes, &[])), want);
    }
    // Device 2 is gone.
    code(
        &run(
            "thin_merge",
            &["--metadata", s(&m), "--dev-id", "2", "--into-thin", "1"],
        ),
        64,
        "merge of a device that is gone",
    );
}

#[test]
fn merging_an_unshared_snapshot_frees_the_origins_tree() {
    // 4 is a snapshot of 3 that was never written: the two share their
    // tree, so merging frees nothing but the sharing.
    let k = small();
    let m = k.copy("m43.img");
    let before3 = mappings(&m, 3, false);
    let out = run(
        "thin_merge",
        &["--metadata", s(&m), "--dev-id", "4", "--into-thin", "3"],
    );
    ok(&out, "merge 4 into 3");
    assert!(stdout(&out).contains("0 data blocks"), "{}", stdout(&out));
    ok(&run("thin_check", &[s(&m)]), "thin_check");
    assert_eq!(device_ids(&m), vec![1, 2, 3]);
    assert_eq!(mappings(&m, 3, false), before3);
    // Then 1 into 2 (the other direction of a snapshot pair).
    ok(
        &run(
            "thin_merge",
            &["--metadata", s(&m), "--dev-id", "1", "--into-thin", "2"],
        ),
        "merge 1 into 2",
    );
    ok(&run("thin_check", &[s(&m)]), "thin_check");
    assert_eq!(device_ids(&m), vec![2, 3]);
    let (bytes, want) = &k.expect["final.thin1"];
    assert_eq!(&sha_bytes(&k.extract(&m, 2, *bytes, &[])), want);
}

#[test]
fn refusals_write_nothing() {
    let k = small();
    let m = k.copy("refuse.img");
    let before = std::fs::read(&m).unwrap();
    let into = |snap: &str, origin: &str| {
        run(
            "thin_merge",
            &["--metadata", s(&m), "--dev-id", snap, "--into-thin", origin],
        )
    };
    code(&into("2", "2"), 64, "same id");
    code(&into("9", "1"), 64, "missing snapshot");
    code(&into("2", "9"), 64, "missing origin");
    code(&into("x", "1"), 64, "bad id");
    code(&into("16777216", "1"), 64, "id above 24 bits");
    code(
        &run(
            "thin_merge",
            &[
                "--metadata",
                s(&m),
                "--dev-id",
                "2",
                "--into-thin",
                "1",
                "--data",
                s(&k.data),
            ],
        ),
        64,
        "--into-thin with --data",
    );
    code(
        &run("thin_merge", &["--metadata", s(&m), "--dev-id", "2"]),
        64,
        "no target",
    );
    assert_eq!(std::fs::read(&m).unwrap(), before);

    // needs_check: refused by both kinds of merge.
    let f = open_rw(&m);
    let mut b = vec![0u8; 4096];
    f.read_exact_at(&mut b, 0).unwrap();
    thinmeta::thin::superblock::set_flags(&mut b, thinmeta::thin::superblock::NEEDS_CHECK_FLAG);
    f.write_all_at(&b, 0).unwrap();
    drop(f);
    let flagged = std::fs::read(&m).unwrap();
    let out = into("2", "1");
    code(&out, 65, "needs_check");
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs_check"));
    let origin = k.dir.join("origin.img");
    std::fs::write(&origin, vec![7u8; 1 << 20]).unwrap();
    let out = run(
        "thin_merge",
        &[
            "--metadata",
            s(&m),
            "--data",
            s(&k.data),
            "--dev-id",
            "1",
            "--origin",
            s(&origin),
        ],
    );
    code(&out, 65, "needs_check, external");
    assert_eq!(std::fs::read(&m).unwrap(), flagged);
    assert_eq!(std::fs::read(&origin).unwrap(), vec![7u8; 1 << 20]);
}

#[test]
fn external_merge_refusals_write_nothing() {
    let k = small();
    let origin = k.dir.join("origin.img");
    let fill = vec![7u8; 1 << 20];
    std::fs::write(&origin, &fill).unwrap();
    let merge = |meta: &Path, data: &Path, origin: &Path, id: &str| {
        run(
            "thin_merge",
            &[
                "--metadata",
                s(meta),
                "--data",
                s(data),
                "--dev-id",
                id,
                "--origin",
                s(origin),
            ],
        )
    };
    code(&merge(&k.meta, &k.data, &origin, "9"), 64, "missing device");
    code(&merge(&k.meta, &k.data, &k.data, "1"), 64, "origin = data");
    code(
        &merge(&k.meta, &k.data, &k.meta, "1"),
        64,
        "origin = metadata",
    );
    let none = k.dir.join("none.img");
    code(&merge(&k.meta, &k.data, &none, "1"), 66, "no origin");
    let short = k.dir.join("short.img");
    std::fs::write(&short, vec![0u8; 4096]).unwrap();
    code(&merge(&k.meta, &short, &origin, "1"), 66, "data too small");
    code(
        &run(
            "thin_merge",
            &[
                "--metadata",
                s(&k.meta),
                "--dev-id",
                "1",
                "--origin",
                s(&origin),
            ],
        ),
        64,
        "no --data",
    );
    assert_eq!(std::fs::read(&origin).unwrap(), fill);
    assert_eq!(
        std::fs::read(&k.meta).unwrap(),
        gunzip(&fixture_dir().join("meta.img.gz"))
    );
    // A merge into a 1 MiB origin copies what fits (blocks 0-15).
    let out = merge(&k.meta, &k.data, &origin, "1");
    ok(&out, "merge into a small origin");
    assert!(String::from_utf8_lossy(&out.stderr).contains("past the end"));
    let got = std::fs::read(&origin).unwrap();
    let pristine = k.dir.join("pristine.img");
    std::fs::write(&pristine, &fill).unwrap();
    let want = k.extract(&k.meta, 1, 1 << 20, &["--origin", s(&pristine)]);
    assert_eq!(got, want);
    assert_ne!(got, fill);
}

fn hold(dev: &str) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(dev)
        .unwrap()
}

#[test]
fn a_pool_or_origin_in_use_is_refused() {
    let k = small();
    let m = k.copy("busy.img");
    let Some(dev) = loop_device_rw(&m) else {
        eprintln!("no loop devices here: busy-device test skipped");
        return;
    };
    let before = std::fs::read(&m).unwrap();
    let origin = k.dir.join("origin.img");
    let fill = vec![7u8; 1 << 20];
    std::fs::write(&origin, &fill).unwrap();
    {
        let _held = hold(&dev.0);
        for args in [
            vec!["--metadata", &dev.0, "--dev-id", "2", "--into-thin", "1"],
            vec![
                "--metadata",
                &dev.0,
                "--data",
                s(&k.data),
                "--dev-id",
                "1",
                "--origin",
                s(&origin),
            ],
        ] {
            let out = run("thin_merge", &args);
            code(&out, 75, "metadata in use");
            assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
        }
        let out = run(
            "thin_extract",
            &["--metadata", &dev.0, "--data", s(&k.data), "--dev-id", "1"],
        );
        code(&out, 75, "extract, metadata in use");
    }
    assert_eq!(std::fs::read(&m).unwrap(), before);
    assert_eq!(std::fs::read(&origin).unwrap(), fill);

    // The origin (and the data device) held: refused too.
    let o2 = k.dir.join("origin2.img");
    std::fs::write(&o2, &fill).unwrap();
    let Some(odev) = loop_device_rw(&o2) else {
        return;
    };
    {
        let _held = hold(&odev.0);
        let out = run(
            "thin_merge",
            &[
                "--metadata",
                s(&k.meta),
                "--data",
                s(&k.data),
                "--dev-id",
                "1",
                "--origin",
                &odev.0,
            ],
        );
        code(&out, 75, "origin in use");
    }
    // Free, the loop device is merged into like a file.
    let out = run(
        "thin_merge",
        &[
            "--metadata",
            s(&k.meta),
            "--data",
            s(&k.data),
            "--dev-id",
            "1",
            "--origin",
            &odev.0,
        ],
    );
    ok(&out, "merge into a loop device");
    let pristine = k.dir.join("pristine.img");
    std::fs::write(&pristine, &fill).unwrap();
    assert_eq!(
        std::fs::read(&odev.0).unwrap(),
        k.extract(&k.meta, 1, 1 << 20, &["--origin", s(&pristine)])
    );
    // thin_extract onto a block device: unmapped blocks are zeroed (a
    // punched hole, or written zeros), whatever the device held.
    ok(
        &run(
            "thin_extract",
            &[
                "--metadata",
                s(&k.meta),
                "--data",
                s(&k.data),
                "--dev-id",
                "3",
                "--size",
                &(1u64 << 20).to_string(),
                "-o",
                &odev.0,
            ],
        ),
        "extract onto a loop device",
    );
    assert_eq!(
        std::fs::read(&odev.0).unwrap(),
        k.extract(&k.meta, 3, 1 << 20, &[])
    );
    // Larger than the device: refused.
    let out = run(
        "thin_extract",
        &[
            "--metadata",
            s(&k.meta),
            "--data",
            s(&k.data),
            "--dev-id",
            "3",
            "--size",
            &(2u64 << 20).to_string(),
            "-o",
            &odev.0,
        ],
    );
    code(&out, 64, "extract larger than the device");
}

#[test]
fn a_locked_origin_file_is_refused() {
    use std::os::unix::io::AsRawFd;
    let k = small();
    let origin = k.dir.join("origin.img");
    std::fs::write(&origin, vec![7u8; 1 << 20]).unwrap();
    let f = std::fs::File::open(&origin).unwrap();
    // SAFETY: flock on an open descriptor.
    assert_eq!(unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) }, 0);
    let out = run(
        "thin_merge",
        &[
            "--metadata",
            s(&k.meta),
            "--data",
            s(&k.data),
            "--dev-id",
            "1",
            "--origin",
            s(&origin),
        ],
    );
    code(&out, 75, "locked origin");
    assert_eq!(std::fs::read(&origin).unwrap(), vec![7u8; 1 << 20]);
}
