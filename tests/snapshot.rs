//! dm-snapshot persistent exception stores: snap_dump, snap_check and
//! snap_merge, on stores the kernel wrote (../shared/testdata, skipped when
//! absent) and on stores built here from the format (several metadata areas,
//! full areas, partial origin chunks, injected corruption), plus an
//! interruption of the merge at every write.

mod common;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::*;
use sha2::{Digest, Sha256};
use thinmeta::snapshot::dev::{Access, Device, Store};
use thinmeta::snapshot::merge::{merge, Options};

const SNAP_MAGIC: u32 = 0x7041_6e53;

fn sha(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// The sha256 recorded for `label` in an `expect` file.
fn expect_sha(expect: &Path, label: &str) -> String {
    let text = std::fs::read_to_string(expect).unwrap();
    text.lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[0] == label).then(|| f[2].to_string())
        })
        .unwrap_or_else(|| panic!("no {label} in {}", expect.display()))
}

fn ok(out: &std::process::Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn merge_bin(origin: &Path, cow: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec![
        "--origin",
        origin.to_str().unwrap(),
        "--cow",
        cow.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    run("snap_merge", &args)
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

// ---------------------------------------------------------------------------
// A store built from the format facts (FORMATS.md §8).

/// A COW store image and what it holds.
#[derive(Clone)]
struct Cow {
    chunk: usize,
    epa: usize,
    bytes: Vec<u8>,
    recs: Vec<(u64, u64)>,
}

impl Cow {
    /// Header (valid, version 1), zeroed metadata areas, every data chunk
    /// filled with its own pattern, and `recs` as the table in order.
    fn new(chunk_sectors: u32, nr_chunks: usize, recs: &[(u64, u64)]) -> Cow {
        let chunk = chunk_sectors as usize * 512;
        let epa = chunk / 16;
        let mut bytes = vec![0u8; nr_chunks * chunk];
        for c in 2..nr_chunks {
            if c % (epa + 1) != 1 {
                fill(&mut bytes[c * chunk..(c + 1) * chunk], b"cow", c as u64);
            }
        }
        let mut cow = Cow {
            chunk,
            epa,
            bytes,
            recs: Vec::new(),
        };
        cow.set_header(SNAP_MAGIC, 1, 1, chunk_sectors);
        for &r in recs {
            cow.push(r);
        }
        cow
    }

    fn set_header(&mut self, magic: u32, valid: u32, version: u32, chunk_sectors: u32) {
        for (i, v) in [magic, valid, version, chunk_sectors].iter().enumerate() {
            self.bytes[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
        }
    }

    fn area_chunk(&self, area: usize) -> usize {
        1 + (self.epa + 1) * area
    }

    fn record_offset(&self, i: usize) -> usize {
        self.area_chunk(i / self.epa) * self.chunk + (i % self.epa) * 16
    }

    fn put(&mut self, i: usize, (old, new): (u64, u64)) {
        let off = self.record_offset(i);
        self.bytes[off..off + 8].copy_from_slice(&old.to_le_bytes());
        self.bytes[off + 8..off + 16].copy_from_slice(&new.to_le_bytes());
    }

    fn push(&mut self, r: (u64, u64)) {
        let i = self.recs.len();
        self.put(i, r);
        self.recs.push(r);
    }

    /// The store after a complete merge: every record in use zeroed.
    fn merged(&self) -> Vec<u8> {
        let mut c = self.clone();
        for i in 0..self.recs.len() {
            c.put(i, (0, 0));
        }
        c.bytes
    }

    /// The origin after a complete merge.
    fn apply(&self, origin: &[u8]) -> Vec<u8> {
        let mut o = origin.to_vec();
        for &(old, new) in &self.recs {
            let dst = old as usize * self.chunk;
            let n = self.chunk.min(o.len() - dst);
            let src = new as usize * self.chunk;
            o[dst..dst + n].copy_from_slice(&self.bytes[src..src + n]);
        }
        o
    }
}

/// COW chunks in the kernel's allocation order: from 2, skipping areas.
fn alloc(epa: usize, n: usize) -> Vec<u64> {
    let mut out = Vec::new();
    let mut next = 2u64;
    while out.len() < n {
        if next % (epa as u64 + 1) == 1 {
            next += 1;
        }
        out.push(next);
        next += 1;
    }
    out
}

/// "TAG<n>.<offset> " repeated: every 16 bytes differ between chunks.
fn fill(buf: &mut [u8], tag: &[u8], n: u64) {
    let mut pos = 0;
    let mut k = 0u64;
    while pos < buf.len() {
        let s = format!("{}{n}.{k} ", String::from_utf8_lossy(tag));
        let take = s.len().min(buf.len() - pos);
        buf[pos..pos + take].copy_from_slice(&s.as_bytes()[..take]);
        pos += take;
        k += 1;
    }
}

fn origin_bytes(len: usize) -> Vec<u8> {
    let mut o = vec![0u8; len];
    for (i, s) in o.chunks_mut(512).enumerate() {
        fill(s, b"org", i as u64);
    }
    o
}

/// A small deterministic generator for test layouts.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// A table over several areas: runs of various lengths and scattered
/// chunks, in the kernel's allocation order, each origin chunk once, with
/// the origin's last (partial) chunk among them. `origin_chunks` counts the
/// partial one.
fn mixed_table(epa: usize, n: usize, origin_chunks: u64, seed: u64) -> Vec<(u64, u64)> {
    let news = alloc(epa, n);
    let mut used = std::collections::HashSet::new();
    let mut olds = Vec::new();
    let mut rng = Lcg(seed);
    olds.push(origin_chunks - 1);
    used.insert(origin_chunks - 1);
    while olds.len() < n {
        let start = rng.next() % origin_chunks;
        let len = match rng.next() % 4 {
            0 => 1,
            1 => 1 + rng.next() % 5,
            _ => 1 + rng.next() % (epa as u64 * 2),
        };
        for o in start..(start + len).min(origin_chunks) {
            if olds.len() < n && used.insert(o) {
                olds.push(o);
            }
        }
    }
    olds.into_iter().zip(news).collect()
}

struct Pair {
    _dir: tempfile::TempDir,
    origin: PathBuf,
    cow: PathBuf,
}

/// Scratch files on tmpfs when there is one: the merge flushes after every
/// step, and the interruption tests run thousands of merges.
fn write_pair(origin: &[u8], cow: &[u8]) -> Pair {
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() && tempfile::tempdir_in(shm).is_ok() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    write_pair_in(&base, origin, cow)
}

fn write_pair_in(base: &Path, origin: &[u8], cow: &[u8]) -> Pair {
    let dir = tempfile::tempdir_in(base).unwrap();
    let o = dir.path().join("origin.img");
    let c = dir.path().join("cow.img");
    std::fs::write(&o, origin).unwrap();
    std::fs::write(&c, cow).unwrap();
    Pair {
        _dir: dir,
        origin: o,
        cow: c,
    }
}

fn dump_json(cow: &Path) -> serde_json::Value {
    let out = run("snap_dump", &["--format", "json", cow.to_str().unwrap()]);
    ok(&out, "snap_dump --format json");
    serde_json::from_slice(&out.stdout).expect("snap_dump json parses")
}

/// The exceptions a JSON dump lists, expanded from its runs.
fn json_exceptions(v: &serde_json::Value) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for a in v["areas"].as_array().unwrap() {
        for r in a["runs"].as_array().unwrap() {
            let (o, n, l) = (
                r["old_begin"].as_u64().unwrap(),
                r["new_begin"].as_u64().unwrap(),
                r["length"].as_u64().unwrap(),
            );
            for i in 0..l {
                out.push((o + i, n + i));
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------
// Stores the kernel wrote.

#[test]
fn kernel_snapshot_merges_to_the_snapshot_view() {
    let Some(td) = shared_testdata() else {
        eprintln!("../shared/testdata not found: skipping");
        return;
    };
    let k = td.join("kernel/snapshot");
    let dir = tempfile::tempdir().unwrap();
    let origin = unpack(&k.join("origin.img.gz"), dir.path(), "origin.img");
    let cow = unpack(&k.join("cow.img.gz"), dir.path(), "cow.img");
    let expect = k.join("snapshot.results/expect");

    // The listing agrees with the kernel's status line for this store.
    let status = std::fs::read_to_string(k.join("snapshot.results/status")).unwrap();
    assert!(status.contains("snapshot 1856/32768 32"), "{status}");
    let check = run(
        "snap_check",
        &[cow.to_str().unwrap(), "--origin", origin.to_str().unwrap()],
    );
    ok(&check, "snap_check");
    let so = String::from_utf8_lossy(&check.stdout);
    assert!(so.contains("SPACE_USED=1856/32768 32"), "{so}");
    assert!(so.contains("EXCEPTIONS=114"), "{so}");
    let v = dump_json(&cow);
    assert_eq!(v["chunk_size"], 16);
    assert_eq!(v["nr_exceptions"], 114);
    assert_eq!(json_exceptions(&v).len(), 114);

    let out = merge_bin(&origin, &cow, &[]);
    ok(&out, "snap_merge");
    assert_eq!(
        sha(&std::fs::read(&origin).unwrap()),
        expect_sha(&expect, "snap")
    );
    // The COW ends as the kernel left its own merged copy.
    assert_eq!(
        std::fs::read(&cow).unwrap(),
        gunzip(&k.join("cow_m.img.gz")),
        "merged COW == the kernel's cow_m.img"
    );
    assert_eq!(
        std::fs::read(&origin).unwrap(),
        gunzip(&k.join("origin_m.img.gz"))
    );
    // A rerun has nothing left to do.
    ok(&merge_bin(&origin, &cow, &[]), "rerun");
    assert_eq!(
        sha(&std::fs::read(&origin).unwrap()),
        expect_sha(&expect, "snap")
    );
    assert_eq!(dump_json(&cow)["nr_exceptions"], 0);
}

#[test]
fn kernel_lvm_snapshot_merges_like_lvconvert() {
    let Some(td) = shared_testdata() else {
        eprintln!("../shared/testdata not found: skipping");
        return;
    };
    let k = td.join("kernel/lvm");
    let dir = tempfile::tempdir().unwrap();
    let lv = unpack(&k.join("lv_copy.img.gz"), dir.path(), "lv.img");
    let cow = unpack(&k.join("cow_copy.img.gz"), dir.path(), "cow.img");
    let expect = k.join("lvm.results/expect");
    assert_eq!(sha(&std::fs::read(&lv).unwrap()), expect_sha(&expect, "lv"));
    let check = run("snap_check", &[cow.to_str().unwrap()]);
    ok(&check, "snap_check");
    assert!(String::from_utf8_lossy(&check.stdout).contains("SPACE_USED=336/32768 32"));
    ok(&merge_bin(&lv, &cow, &[]), "snap_merge");
    let got = sha(&std::fs::read(&lv).unwrap());
    assert_eq!(got, expect_sha(&expect, "lv.after-merge"));
    assert_eq!(got, expect_sha(&expect, "csnap"));
}

#[test]
fn kernel_overflowed_store_is_refused() {
    let Some(td) = shared_testdata() else {
        eprintln!("../shared/testdata not found: skipping");
        return;
    };
    let k = td.join("kernel/snapshot");
    let dir = tempfile::tempdir().unwrap();
    let origin = unpack(&k.join("ovl_origin.img.gz"), dir.path(), "o.img");
    let cow = unpack(&k.join("ovl_cow.img.gz"), dir.path(), "c.img");
    let (o0, c0) = (
        std::fs::read(&origin).unwrap(),
        std::fs::read(&cow).unwrap(),
    );
    let out = merge_bin(&origin, &cow, &[]);
    assert_one_line_error(&out, "merge of an invalid store");
    assert_eq!(out.status.code(), Some(65));
    assert!(stderr(&out).contains("invalid"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&origin).unwrap(), o0);
    assert_eq!(std::fs::read(&cow).unwrap(), c0);
    let check = run("snap_check", &[cow.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(65));
    assert!(stderr(&check).contains("marked invalid"));
    // snap_dump still lists it, saying it is invalid.
    let v = dump_json(&cow);
    assert_eq!(v["valid"], false);
    assert_eq!(v["nr_exceptions"], 24);
}

#[test]
fn kernel_merge_survives_an_interruption_at_every_write() {
    let Some(td) = shared_testdata() else {
        eprintln!("../shared/testdata not found: skipping");
        return;
    };
    let k = td.join("kernel/snapshot");
    let origin = gunzip(&k.join("origin.img.gz"));
    let cow = gunzip(&k.join("cow.img.gz"));
    let want = expect_sha(&k.join("snapshot.results/expect"), "snap");
    let want_cow = gunzip(&k.join("cow_m.img.gz"));
    every_interruption(&origin, &cow, |o, c| {
        assert_eq!(sha(o), want);
        assert_eq!(c, &want_cow[..]);
    });
}

// ---------------------------------------------------------------------------
// Interruptions.

/// Merge with a failure injected after k writes, for every k until a run
/// completes, each time followed by a full rerun; `verify` gets the final
/// origin and COW of every case (and of the uninterrupted merge).
fn every_interruption(origin: &[u8], cow: &[u8], verify: impl Fn(&[u8], &[u8])) {
    let p = write_pair(origin, cow);
    let opts = Options {
        io_size: 64 << 10, // several writes per long run
        ..Options::default()
    };
    let run_lib = |budget: Option<u64>| {
        let o = retry_busy(|| Device::open(&p.origin, Access::WriteExclusive)).unwrap();
        let c = retry_busy(|| Device::open(&p.cow, Access::WriteExclusive)).unwrap();
        let opts = Options {
            fail_after_writes: budget,
            ..opts.clone()
        };
        merge(&o, "origin", &c, "cow", &opts, &mut |_| {}, &mut |_, _| {})
    };
    run_lib(None).unwrap();
    let (o_full, c_full) = (
        std::fs::read(&p.origin).unwrap(),
        std::fs::read(&p.cow).unwrap(),
    );
    verify(&o_full, &c_full);
    let mut k = 0;
    loop {
        std::fs::write(&p.origin, origin).unwrap();
        std::fs::write(&p.cow, cow).unwrap();
        let r = run_lib(Some(k));
        let finished = r.is_ok();
        if let Err(e) = &r {
            assert!(e.to_string().contains("injected failure"), "k={k}: {e}");
            assert!(e.to_string().contains("rerun to resume"), "k={k}: {e}");
        }
        run_lib(None).unwrap_or_else(|e| panic!("rerun after {k} writes: {e}"));
        let (o, c) = (
            std::fs::read(&p.origin).unwrap(),
            std::fs::read(&p.cow).unwrap(),
        );
        assert!(
            o == o_full,
            "origin differs after an interruption at write {k}"
        );
        assert!(
            c == c_full,
            "COW differs after an interruption at write {k}"
        );
        if finished {
            break;
        }
        k += 1;
        assert!(k < 100_000, "the merge never finished");
    }
    assert!(k > 2, "only {k} writes: the test covers too little");
}

/// A disk with a volatile write cache: writes land in `pending` until a
/// flush; a crash loses some or all of them.
struct CacheDisk {
    durable: Mutex<Vec<u8>>,
    pending: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl CacheDisk {
    fn new(b: &[u8]) -> CacheDisk {
        CacheDisk {
            durable: Mutex::new(b.to_vec()),
            pending: Mutex::new(Vec::new()),
        }
    }
    /// What survives a crash: the durable bytes plus the pending writes
    /// that `keep` selects (by index), in order.
    fn crash(&self, keep: impl Fn(usize) -> bool) -> Vec<u8> {
        let mut d = self.durable.lock().unwrap().clone();
        for (i, (off, b)) in self.pending.lock().unwrap().iter().enumerate() {
            if keep(i) {
                d[*off as usize..*off as usize + b.len()].copy_from_slice(b);
            }
        }
        d
    }
}

impl Store for CacheDisk {
    fn size(&self) -> u64 {
        self.durable.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        // Reads see the cache.
        let d = self.crash(|_| true);
        buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.pending.lock().unwrap().push((off, buf.to_vec()));
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        let d = self.crash(|_| true);
        *self.durable.lock().unwrap() = d;
        self.pending.lock().unwrap().clear();
        Ok(())
    }
}

/// A crash after k writes where the disks lose every unflushed write, keep
/// them all, or keep every other one: the flush before each commit makes
/// all of these resumable.
fn every_crash_with_write_cache(origin: &[u8], cow: &[u8]) {
    let model = {
        let o = CacheDisk::new(origin);
        let c = CacheDisk::new(cow);
        merge(
            &o,
            "o",
            &c,
            "c",
            &Options::default(),
            &mut |_| {},
            &mut |_, _| {},
        )
        .unwrap();
        (o.crash(|_| true), c.crash(|_| true))
    };
    let policies: [&dyn Fn(usize) -> bool; 3] = [&|_| false, &|_| true, &|i| i % 2 == 1];
    let mut k = 0;
    loop {
        let mut finished = false;
        for keep in policies {
            let o = CacheDisk::new(origin);
            let c = CacheDisk::new(cow);
            let opts = Options {
                fail_after_writes: Some(k),
                io_size: 4096,
                ..Options::default()
            };
            finished = merge(&o, "o", &c, "c", &opts, &mut |_| {}, &mut |_, _| {}).is_ok();
            let o2 = CacheDisk::new(&o.crash(keep));
            let c2 = CacheDisk::new(&c.crash(keep));
            merge(
                &o2,
                "o",
                &c2,
                "c",
                &Options::default(),
                &mut |_| {},
                &mut |_, _| {},
            )
            .unwrap_or_else(|e| panic!("rerun after a crash at write {k}: {e}"));
            assert!(
                o2.crash(|_| true) == model.0,
                "origin differs, crash at write {k}"
            );
            assert!(
                c2.crash(|_| true) == model.1,
                "COW differs, crash at write {k}"
            );
        }
        if finished {
            break;
        }
        k += 1;
    }
}

#[test]
fn multi_area_merge_survives_an_interruption_at_every_write() {
    // 512-byte chunks: 32 records per area; 150 exceptions fill 4 areas and
    // part of a fifth. The origin ends 100 bytes into its last chunk.
    let origin_chunks = 400u64;
    let origin = origin_bytes((origin_chunks as usize - 1) * 512 + 100);
    let recs = mixed_table(32, 150, origin_chunks, 7);
    let cow = Cow::new(1, 200, &recs);
    let want_o = cow.apply(&origin);
    let want_c = cow.merged();
    every_interruption(&origin, &cow.bytes, |o, c| {
        assert!(o == want_o, "origin != model");
        assert!(c == want_c, "COW != model");
    });
    every_crash_with_write_cache(&origin, &cow.bytes);
}

#[test]
fn full_areas_merge_and_resume() {
    // Exactly two full areas: the table ends at the (zeroed) third area.
    let epa = 32;
    let news = alloc(epa, 2 * epa);
    let recs: Vec<(u64, u64)> = news
        .iter()
        .enumerate()
        .map(|(i, &n)| ((i as u64 * 7) % 100, n))
        .collect();
    let cow = Cow::new(1, 2 * (epa + 1) + 3, &recs);
    let origin = origin_bytes(100 * 512);
    let v = dump_json(&write_pair(&origin, &cow.bytes).cow);
    assert_eq!(v["nr_exceptions"], 64);
    assert_eq!(v["areas"].as_array().unwrap().len(), 3);
    assert_eq!(json_exceptions(&v), recs);
    let want_o = cow.apply(&origin);
    let want_c = cow.merged();
    every_interruption(&origin, &cow.bytes, |o, c| {
        assert!(o == want_o);
        assert!(c == want_c);
    });
    every_crash_with_write_cache(&origin, &cow.bytes);
}

#[test]
fn binary_merges_multi_area_stores_with_4k_and_1k_chunks() {
    for (chunk_sectors, n, origin_chunks, seed) in
        [(8u32, 700usize, 3000u64, 1u64), (2, 300, 1000, 2)]
    {
        let epa = chunk_sectors as usize * 512 / 16;
        let recs = mixed_table(epa, n, origin_chunks, seed);
        let max_new = recs.iter().map(|r| r.1).max().unwrap() as usize;
        let cow = Cow::new(chunk_sectors, max_new + 3, &recs);
        let origin = origin_bytes((origin_chunks as usize - 1) * cow.chunk + cow.chunk * 3 / 8);
        let p = write_pair(&origin, &cow.bytes);
        let v = dump_json(&p.cow);
        assert_eq!(
            json_exceptions(&v),
            recs,
            "{chunk_sectors}: dump lists the table"
        );
        ok(
            &run(
                "snap_check",
                &[
                    p.cow.to_str().unwrap(),
                    "--origin",
                    p.origin.to_str().unwrap(),
                ],
            ),
            "snap_check",
        );
        let dry = merge_bin(&p.origin, &p.cow, &["--dry-run"]);
        ok(&dry, "--dry-run");
        assert!(
            std::fs::read(&p.origin).unwrap() == origin,
            "dry run wrote the origin"
        );
        assert!(
            std::fs::read(&p.cow).unwrap() == cow.bytes,
            "dry run wrote the COW"
        );
        let text = String::from_utf8_lossy(&dry.stdout);
        assert!(
            text.contains(&format!("would merge {n} exception(s)")),
            "{text}"
        );
        let out = merge_bin(&p.origin, &p.cow, &[]);
        ok(&out, "snap_merge");
        assert!(stderr(&out).contains("partial chunk"), "{}", stderr(&out));
        assert!(std::fs::read(&p.origin).unwrap() == cow.apply(&origin));
        assert!(std::fs::read(&p.cow).unwrap() == cow.merged());
        let check = run("snap_check", &[p.cow.to_str().unwrap()]);
        ok(&check, "snap_check after the merge");
        assert!(String::from_utf8_lossy(&check.stdout).contains("EXCEPTIONS=0"));
    }
}

#[test]
fn kill_9_then_rerun_gives_the_uninterrupted_result() {
    // Scattered single-chunk runs: one flush pair per chunk keeps the merge
    // running long enough to be killed in the middle.
    let epa = 256;
    let n = 500;
    let news = alloc(epa, n);
    let recs: Vec<(u64, u64)> = news
        .iter()
        .enumerate()
        .map(|(i, &nw)| ((i as u64 * 2) % 8000, nw))
        .collect();
    let cow = Cow::new(8, *news.last().unwrap() as usize + 2, &recs);
    let origin = origin_bytes(8000 * 4096);
    let want_o = cow.apply(&origin);
    let want_c = cow.merged();
    let mut interrupted = 0;
    for delay_ms in [5u64, 20, 60, 150, 400] {
        // On a real disk (not tmpfs), so that the flushes take time.
        let p = write_pair_in(&std::env::temp_dir(), &origin, &cow.bytes);
        let mut child = std::process::Command::new(bin())
            .args(["snap_merge", "--origin"])
            .arg(&p.origin)
            .arg("--cow")
            .arg(&p.cow)
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        let _ = child.kill(); // SIGKILL
        let st = child.wait().unwrap();
        if !st.success() {
            interrupted += 1;
        }
        ok(&merge_bin(&p.origin, &p.cow, &[]), "rerun after kill -9");
        assert!(
            std::fs::read(&p.origin).unwrap() == want_o,
            "origin, kill after {delay_ms} ms"
        );
        assert!(
            std::fs::read(&p.cow).unwrap() == want_c,
            "COW, kill after {delay_ms} ms"
        );
    }
    eprintln!("kill -9: {interrupted} of 5 runs were interrupted");
}

// ---------------------------------------------------------------------------
// Bad input: refused before anything is written.

/// Every tool refuses `cow` with one line; `snap_merge` writes nothing.
fn refused(cow: &[u8], origin: &[u8], code: i32, phrase: &str) {
    let p = write_pair(origin, cow);
    let out = merge_bin(&p.origin, &p.cow, &[]);
    assert_one_line_error(&out, phrase);
    assert_eq!(out.status.code(), Some(code), "{phrase}: {}", stderr(&out));
    assert!(
        stderr(&out).contains(phrase),
        "want '{phrase}': {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains(p.cow.to_str().unwrap()),
        "names the device: {}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).lines().count(), 1, "{}", stderr(&out));
    assert!(
        std::fs::read(&p.origin).unwrap() == origin,
        "{phrase}: origin written"
    );
    assert!(
        std::fs::read(&p.cow).unwrap() == cow,
        "{phrase}: COW written"
    );
    let check = run(
        "snap_check",
        &[
            p.cow.to_str().unwrap(),
            "--origin",
            p.origin.to_str().unwrap(),
        ],
    );
    assert!(
        matches!(check.status.code(), Some(65) | Some(66)),
        "snap_check on {phrase}: {:?}",
        check.status.code()
    );
    assert!(
        stderr(&check).contains(phrase),
        "snap_check: {}",
        stderr(&check)
    );
}

#[test]
fn bad_headers_and_truncated_stores_are_refused_before_writing() {
    let recs: Vec<(u64, u64)> = alloc(32, 40)
        .into_iter()
        .enumerate()
        .map(|(i, n)| (i as u64, n))
        .collect();
    let good = Cow::new(1, 80, &recs);
    let origin = origin_bytes(64 * 512);
    let with = |f: &dyn Fn(&mut Cow)| {
        let mut c = good.clone();
        f(&mut c);
        c.bytes
    };
    refused(
        &with(&|c| c.set_header(0x12345678, 1, 1, 1)),
        &origin,
        65,
        "bad magic 0x12345678",
    );
    refused(
        &with(&|c| c.set_header(0, 0, 0, 0)),
        &origin,
        65,
        "no snapshot header",
    );
    refused(
        &with(&|c| c.set_header(SNAP_MAGIC, 1, 2, 1)),
        &origin,
        65,
        "unsupported store version 2",
    );
    refused(
        &with(&|c| c.set_header(SNAP_MAGIC, 1, 1, 3)),
        &origin,
        65,
        "not a power of two",
    );
    refused(
        &with(&|c| c.set_header(SNAP_MAGIC, 1, 1, 0)),
        &origin,
        65,
        "not a power of two",
    );
    refused(
        &with(&|c| c.set_header(SNAP_MAGIC, 1, 1, 1 << 23)),
        &origin,
        65,
        "larger than the kernel allows",
    );
    refused(
        &with(&|c| c.set_header(SNAP_MAGIC, 0, 1, 1)),
        &origin,
        65,
        "invalid",
    );
    // Truncated: only the header chunk; a header chunk shorter than 16 bytes.
    refused(&good.bytes[..512], &origin, 66, "too small");
    refused(&good.bytes[..10], &origin, 66, "too small");
    // Area 0 full, area 1 past the end of the device.
    let full: Vec<(u64, u64)> = alloc(32, 32)
        .into_iter()
        .enumerate()
        .map(|(i, n)| (i as u64, n))
        .collect();
    let c = Cow::new(1, 34, &full);
    refused(&c.bytes, &origin, 65, "past the end of the device");
}

#[test]
fn snap_check_finds_injected_corruption_and_merge_refuses_it() {
    let epa = 32;
    let recs: Vec<(u64, u64)> = alloc(epa, 50)
        .into_iter()
        .enumerate()
        .map(|(i, n)| (i as u64 * 3, n))
        .collect();
    let good = Cow::new(1, 100, &recs);
    let origin = origin_bytes(200 * 512);
    let p = write_pair(&origin, &good.bytes);
    ok(
        &run(
            "snap_check",
            &[
                p.cow.to_str().unwrap(),
                "--origin",
                p.origin.to_str().unwrap(),
            ],
        ),
        "snap_check on the good store",
    );
    let area1 = good.area_chunk(1) as u64;
    let cases: Vec<(&str, usize, (u64, u64), i32)> = vec![
        // (phrase, record, new value, snap_merge exit)
        (
            "origin chunk 9 already has an exception at area 0 record 3",
            40,
            (9, recs[40].1),
            65,
        ),
        (
            "COW chunk 5 is already used by the exception at area 0 record 3",
            45,
            (1, 5),
            65,
        ),
        ("COW chunk past the end of the device", 20, (2, 100), 65),
        ("is metadata area 1, not a data chunk", 33, (4, area1), 65),
        (
            "origin chunk past the end of the origin",
            12,
            (200, recs[12].1),
            66,
        ),
    ];
    for (phrase, i, rec, code) in cases {
        let mut c = good.clone();
        c.put(i, rec);
        let p = write_pair(&origin, &c.bytes);
        let check = run(
            "snap_check",
            &[
                p.cow.to_str().unwrap(),
                "--origin",
                p.origin.to_str().unwrap(),
            ],
        );
        assert_eq!(
            check.status.code(),
            Some(65),
            "{phrase}: {}",
            stderr(&check)
        );
        assert!(
            stderr(&check).contains(phrase),
            "want '{phrase}': {}",
            stderr(&check)
        );
        assert!(
            stderr(&check).contains("check failed: 1 problem(s)"),
            "{}",
            stderr(&check)
        );
        let out = merge_bin(&p.origin, &p.cow, &[]);
        assert_eq!(
            out.status.code(),
            Some(code),
            "merge, {phrase}: {}",
            stderr(&out)
        );
        assert_one_line_error(&out, phrase);
        assert!(
            std::fs::read(&p.origin).unwrap() == origin,
            "{phrase}: origin written"
        );
        assert!(
            std::fs::read(&p.cow).unwrap() == c.bytes,
            "{phrase}: COW written"
        );
    }
    // Out of order: found by snap_check, merged (with a note) as the kernel would.
    let mut c = good.clone();
    let (a, b) = (c.recs[10], c.recs[11]);
    c.recs[10] = (a.0, b.1);
    c.recs[11] = (b.0, a.1);
    c.put(10, c.recs[10]);
    c.put(11, c.recs[11]);
    let p = write_pair(&origin, &c.bytes);
    let check = run("snap_check", &[p.cow.to_str().unwrap()]);
    assert_eq!(check.status.code(), Some(65));
    assert!(
        stderr(&check).contains("lower than the previous record"),
        "{}",
        stderr(&check)
    );
    let out = merge_bin(&p.origin, &p.cow, &[]);
    ok(&out, "merge of an out-of-order table");
    assert!(stderr(&out).contains("out of order"), "{}", stderr(&out));
    assert!(std::fs::read(&p.origin).unwrap() == c.apply(&origin));
    // The origin too small for the table: reported, nothing merged.
    let small = origin_bytes(100 * 512);
    let p = write_pair(&small, &good.bytes);
    let out = merge_bin(&p.origin, &p.cow, &[]);
    assert_eq!(out.status.code(), Some(66));
    assert!(
        stderr(&out).contains("the origin is too small"),
        "{}",
        stderr(&out)
    );
    assert!(std::fs::read(&p.origin).unwrap() == small);
}

#[test]
fn output_formats() {
    let recs = vec![(0, 2), (1, 3), (2, 4), (10, 5), (11, 6), (0x1_0000_0000, 7)];
    let cow = Cow::new(8, 20, &recs);
    let p = write_pair(&origin_bytes(4096), &cow.bytes);
    let c = p.cow.to_str().unwrap();
    let v = dump_json(&p.cow);
    assert_eq!(v["chunk_size"], 8);
    assert_eq!(v["valid"], true);
    assert_eq!(v["version"], 1);
    assert_eq!(v["exceptions_per_area"], 256);
    assert_eq!(v["cow_sectors"], 160);
    assert_eq!(v["nr_chunks"], 20);
    assert_eq!(v["allocated_sectors"], 64); // next free chunk 8
    assert_eq!(v["metadata_sectors"], 16);
    assert_eq!(v["truncated_area"], serde_json::Value::Null);
    assert_eq!(v["areas"][0]["runs"].as_array().unwrap().len(), 3);
    assert_eq!(json_exceptions(&v), recs);
    let xml = run("snap_dump", &["-f", "xml", c]);
    ok(&xml, "xml");
    let xml = String::from_utf8(xml.stdout).unwrap();
    assert!(xml.starts_with("<snapshot_store chunk_size=\"8\" valid=\"1\" version=\"1\" exceptions_per_area=\"256\" cow_sectors=\"160\" nr_chunks=\"20\" nr_exceptions=\"6\" allocated_sectors=\"64\" metadata_sectors=\"16\">\n"), "{xml}");
    assert!(xml.contains("    <run old_begin=\"0\" new_begin=\"2\" length=\"3\"/>\n"));
    assert!(xml.contains("    <run old_begin=\"4294967296\" new_begin=\"7\" length=\"1\"/>\n"));
    assert!(xml.ends_with("  </area>\n</snapshot_store>\n"));
    let human = run("snap_dump", &[c]);
    ok(&human, "human");
    let h = String::from_utf8(human.stdout).unwrap();
    assert!(
        h.contains("space used:        64/160 sectors, metadata 16 sectors"),
        "{h}"
    );
    assert!(h.contains("  old 0-2 -> new 2-4 (3 chunks)"), "{h}");
    let out_file = p.cow.with_extension("json");
    ok(
        &run(
            "snap_dump",
            &["-f", "json", "-o", out_file.to_str().unwrap(), c],
        ),
        "-o",
    );
    let _: serde_json::Value = serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    // An empty table.
    let empty = Cow::new(8, 4, &[]);
    let p = write_pair(&origin_bytes(4096), &empty.bytes);
    let v = dump_json(&p.cow);
    assert_eq!(v["nr_exceptions"], 0);
    assert_eq!(v["areas"][0]["runs"].as_array().unwrap().len(), 0);
    ok(
        &merge_bin(&p.origin, &p.cow, &[]),
        "merge of an empty table",
    );
}

#[test]
fn usage_errors_busy_devices_and_same_device() {
    let cow = Cow::new(1, 10, &[(0, 2)]);
    let p = write_pair(&origin_bytes(4096), &cow.bytes);
    for (tool, args) in [
        ("snap_merge", vec!["--cow", p.cow.to_str().unwrap()]),
        ("snap_merge", vec!["--origin", "x", "--cow", "y", "--bogus"]),
        ("snap_dump", vec![]),
        ("snap_dump", vec!["-f", "yaml", p.cow.to_str().unwrap()]),
        ("snap_check", vec![]),
    ] {
        let out = run(tool, &args);
        assert_eq!(out.status.code(), Some(64), "{tool} {args:?}");
    }
    for tool in ["snap_merge", "snap_dump", "snap_check"] {
        let out = run(tool, &["-V"]);
        ok(&out, "-V");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            env!("CARGO_PKG_VERSION")
        );
    }
    // The same file as origin and COW.
    let out = merge_bin(&p.cow, &p.cow, &[]);
    assert_eq!(out.status.code(), Some(64));
    // Missing devices.
    let out = merge_bin(Path::new("/nonexistent/o"), &p.cow, &[]);
    assert_eq!(out.status.code(), Some(66));
    // A device another merge holds: exit 75, nothing written.
    let held = Device::open(&p.cow, Access::WriteExclusive).unwrap();
    let out = merge_bin(&p.origin, &p.cow, &[]);
    assert_eq!(out.status.code(), Some(75), "{}", stderr(&out));
    assert!(stderr(&out).contains("in use"));
    assert_eq!(
        run("snap_dump", &[p.cow.to_str().unwrap()]).status.code(),
        Some(75)
    );
    drop(held);
    let held = Device::open(&p.origin, Access::WriteExclusive).unwrap();
    assert_eq!(merge_bin(&p.origin, &p.cow, &[]).status.code(), Some(75));
    drop(held);
    assert!(std::fs::read(&p.cow).unwrap() == cow.bytes);
    ok(&merge_bin(&p.origin, &p.cow, &[]), "merge once free");
    // gzip images can be read, but not merged into.
    let gz = p.cow.with_extension("gz");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::fast(),
    );
    std::io::Write::write_all(&mut enc, &cow.bytes).unwrap();
    enc.finish().unwrap();
    ok(
        &run("snap_check", &[gz.to_str().unwrap()]),
        "snap_check of a .gz",
    );
    assert_eq!(merge_bin(&p.origin, &gz, &[]).status.code(), Some(64));
}
