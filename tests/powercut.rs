//! Power cut at every write, for every writer.
//!
//! Each writer runs once, in this process (`thinmeta::cli::dispatch`, the
//! real command code), while `pdata::io::record` logs every write, flush and
//! size change it issues to the files of the test, in order. The log is the
//! model of a disk with a volatile write cache: a write is durable once its
//! file is flushed, and until then it may be lost, or land while an earlier
//! one does not. Writes are split into 4 KiB pieces (a large write is not
//! atomic either).
//!
//! The log is then replayed onto the files as they were before the run, to
//! crash points (prefixes of the log), and at each point to several
//! variants of the writes since each file's last flush: all of them in
//! order, none, each one dropped, all in reverse order, and random subsets
//! in random order (fixed seeds). After each, the property of the writer:
//! - metadata writers: the metadata checks exactly as the old pool or as the
//!   new one (superblock, every finding of thin_check, the thin_dump);
//! - thin_merge --origin and snap_merge: a rerun on the crashed state ends
//!   with the uninterrupted result, byte for byte;
//! - thin_shrink: the input metadata still reads every one of its data
//!   blocks unchanged, and the output is the old device or the new pool,
//!   whose devices read as before.
//!
//! Each writer prints how many crash points and states it tried. In
//! release builds every crash point gets the plain prefix; for writers with
//! hundreds of writes the dropped and reordered variants are tried at
//! evenly spaced points (every point next to a flush always); the counts
//! say how many.

mod common;

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use common::*;
use thinmeta::pdata::io::record::{Event, Op, Recording};
use thinmeta::pdata::io::{BlockDevice, OpenMode};
use thinmeta::thin::check::{check, rebuild_space_maps, CheckOptions};
use thinmeta::thin::superblock::{read_superblock, NEEDS_CHECK_FLAG};

/// Run a tool in this process; its exit code.
fn tool(args: &[&str]) -> i32 {
    let mut v: Vec<OsString> = vec!["thinmeta".into()];
    v.extend(args.iter().map(OsString::from));
    thinmeta::cli::dispatch(v)
}

fn tool_ok(args: &[&str]) {
    assert_eq!(tool(args), 0, "{args:?}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Scratch space on tmpfs when there is one: thousands of small images.
fn scratch() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    match tempfile::tempdir_in(shm) {
        Ok(d) if shm.is_dir() => d,
        _ => tempfile::tempdir().unwrap(),
    }
}

/// Fewer states in debug builds (`cargo test`); all of them in release.
fn budget(release: usize) -> usize {
    if cfg!(debug_assertions) {
        (release / 6).max(12)
    } else {
        release
    }
}

//------------------------------------------------------------------------------
// The disk model

/// Run `f` while recording `files`; the log, each write cut into pieces
/// that do not cross a 4 KiB boundary.
fn record(files: &[&Path], f: impl FnOnce()) -> Vec<Event> {
    let rec = Recording::start(files).unwrap();
    f();
    let mut out = Vec::new();
    for e in rec.finish() {
        match e.op {
            Op::Write { offset, bytes } => {
                let mut done = 0usize;
                while done < bytes.len() {
                    let at = offset + done as u64;
                    let n = ((4096 - at % 4096) as usize).min(bytes.len() - done);
                    out.push(Event {
                        file: e.file,
                        op: Op::Write {
                            offset: at,
                            bytes: bytes[done..done + n].to_vec(),
                        },
                    });
                    done += n;
                }
            }
            op => out.push(Event { file: e.file, op }),
        }
    }
    out
}

fn apply(img: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write { offset, bytes } => {
            let end = *offset as usize + bytes.len();
            if img.len() < end {
                img.resize(end, 0);
            }
            img[*offset as usize..end].copy_from_slice(bytes);
        }
        Op::SetLen(n) => img.resize(*n as usize, 0),
        Op::Flush => {}
    }
}

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

/// Make `p` hold `img`: only the 4 KiB pieces that differ from `was`
/// (what it holds) when that is known.
fn write_changes(p: &Path, was: Option<&Vec<u8>>, img: &[u8]) {
    use std::os::unix::fs::FileExt;
    match was {
        Some(was) if was.len() == img.len() => {
            let f = open_rw(p);
            for (i, (a, b)) in was.chunks(4096).zip(img.chunks(4096)).enumerate() {
                if a != b {
                    f.write_all_at(b, i as u64 * 4096).unwrap();
                }
            }
        }
        _ => std::fs::write(p, img).unwrap(),
    }
}

/// A size change is not a cached write: a file system orders it before the
/// writes that follow it (they land in blocks the file only has once it
/// is durable). So writes after a lost size change of their file are lost
/// too, and the size changes kept apply first, in their order.
fn size_changes_first(log: &[Event], pending: &[usize], chosen: Vec<usize>) -> Vec<usize> {
    let kept: std::collections::HashSet<usize> = chosen.iter().copied().collect();
    let lost_from = |file: usize| {
        pending.iter().copied().find(|&i| {
            log[i].file == file && matches!(log[i].op, Op::SetLen(_)) && !kept.contains(&i)
        })
    };
    let alive = |i: usize| lost_from(log[i].file).map_or(true, |l| i < l);
    let mut out: Vec<usize> = pending
        .iter()
        .copied()
        .filter(|&i| kept.contains(&i) && matches!(log[i].op, Op::SetLen(_)) && alive(i))
        .collect();
    out.extend(
        chosen
            .into_iter()
            .filter(|&i| !matches!(log[i].op, Op::SetLen(_)) && alive(i)),
    );
    out
}

/// What a replay tried.
#[derive(Debug, Default)]
struct Tried {
    events: usize,
    writes: usize,
    flushes: usize,
    points: usize,
    states: usize,
    distinct: usize,
    /// The first write went to byte 0 of a file.
    first_write_at_0: bool,
}

/// Replay `log` over `orig` (the files' bytes before the run) onto
/// `paths`, and call `verify` on each crash state: about `max_states` of
/// them, at every crash point when there are few, else at evenly spaced
/// ones and those next to a flush.
fn replay(
    name: &str,
    paths: &[&Path],
    orig: &[Vec<u8>],
    log: &[Event],
    max_states: usize,
    verify_keeps_files: bool,
    verify: impl FnMut(&[Vec<u8>]) -> Result<(), String>,
) -> Tried {
    let (t, failures) = replay_failures(
        name,
        paths,
        orig,
        log,
        max_states,
        verify_keeps_files,
        verify,
    );
    assert!(
        failures.is_empty(),
        "{name}: a power cut leaves a bad state:\n{}",
        failures.join("\n")
    );
    t
}

/// As [`replay`]: what was tried, and the first few failures.
fn replay_failures(
    name: &str,
    paths: &[&Path],
    orig: &[Vec<u8>],
    log: &[Event],
    max_states: usize,
    verify_keeps_files: bool,
    mut verify: impl FnMut(&[Vec<u8>]) -> Result<(), String>,
) -> (Tried, Vec<String>) {
    let n = log.len();
    let mut t = Tried {
        events: n,
        writes: log
            .iter()
            .filter(|e| matches!(e.op, Op::Write { .. }))
            .count(),
        flushes: log.iter().filter(|e| e.op == Op::Flush).count(),
        first_write_at_0: log
            .iter()
            .find(|e| matches!(e.op, Op::Write { .. }))
            .is_some_and(|e| matches!(e.op, Op::Write { offset: 0, .. })),
        ..Default::default()
    };
    // Crash points: after k events, k in 0..=n. All of them when the
    // budget allows; else the points next to a flush and evenly spaced ones.
    let cap = (max_states / 6).max(8);
    let mut points = std::collections::BTreeSet::new();
    if n < cap {
        points.extend(0..=n);
    } else {
        let flushes: Vec<usize> = (0..n).filter(|&i| log[i].op == Op::Flush).collect();
        if flushes.len() * 2 <= cap / 2 {
            for i in flushes {
                points.insert(i);
                points.insert(i + 1);
            }
        }
        let spread = cap.saturating_sub(points.len()).max(2);
        for j in 0..spread {
            points.insert(j * n / (spread - 1));
        }
    }
    let mut durable: Vec<Vec<u8>> = orig.to_vec();
    let mut pending: Vec<usize> = Vec::new();
    let mut flushes = 0usize;
    let mut seen: HashSet<(usize, Vec<usize>)> = HashSet::new();
    let mut failures = Vec::new();
    // What the files hold, when `verify` leaves them as it found them.
    let mut on_disk: Vec<Vec<u8>> = Vec::new();
    let start = std::time::Instant::now();
    // Every other point gets the plain prefix (every write issued kept)
    // alone: in release builds always, so every prefix of every writer's
    // log is tried; in debug builds up to four times as many points again.
    let prefix_only = !cfg!(debug_assertions) || n < 4 * cap;
    for k in 0..=n {
        let full = points.contains(&k);
        if full || prefix_only {
            t.points += 1;
            let mut variants: Vec<(String, Vec<usize>)> = vec![("all".into(), pending.clone())];
            if full && !pending.is_empty() {
                variants.push(("none".into(), vec![]));
                let p = pending.len();
                let drops: Vec<usize> = if p <= 12 {
                    (0..p).collect()
                } else {
                    (0..6).map(|j| j * (p - 1) / 5).collect()
                };
                for d in drops {
                    let mut v = pending.clone();
                    v.remove(d);
                    variants.push((format!("drop #{}", pending[d]), v));
                }
            }
            if full && pending.len() >= 2 {
                variants.push(("reversed".into(), pending.iter().rev().copied().collect()));
            }
            if full && pending.len() >= 3 {
                let seeds = if pending.len() > 12 { 2 } else { 3 };
                for seed in 0..seeds {
                    let mut rng = Lcg(k as u64 * 7919 + seed);
                    let mut v: Vec<usize> = pending
                        .iter()
                        .copied()
                        .filter(|_| rng.next() % 2 == 0)
                        .collect();
                    for i in (1..v.len()).rev() {
                        let j = (rng.next() % (i as u64 + 1)) as usize;
                        v.swap(i, j);
                    }
                    variants.push((format!("random {seed}"), v));
                }
            }
            for (label, chosen) in variants {
                let chosen = size_changes_first(log, &pending, chosen);
                t.states += 1;
                if !seen.insert((flushes, chosen.clone())) {
                    continue;
                }
                t.distinct += 1;
                let mut imgs = durable.clone();
                for &i in &chosen {
                    apply(&mut imgs[log[i].file], &log[i].op);
                }
                for (i, (p, img)) in paths.iter().zip(&imgs).enumerate() {
                    write_changes(p, on_disk.get(i), img);
                }
                if verify_keeps_files {
                    on_disk = imgs.clone();
                }
                if let Err(e) = verify(&imgs) {
                    failures.push(format!("after {k} of {n} events, {label}: {e}"));
                    if failures.len() >= 5 {
                        break;
                    }
                }
            }
            if failures.len() >= 5 {
                break;
            }
        }
        if k == n {
            break;
        }
        let e = &log[k];
        if e.op == Op::Flush {
            flushes += 1;
            let f = e.file;
            let (mine, rest): (Vec<usize>, Vec<usize>) =
                pending.iter().partition(|&&i| log[i].file == f);
            for i in mine {
                apply(&mut durable[f], &log[i].op);
            }
            pending = rest;
        } else {
            pending.push(k);
        }
    }
    // Straight to stderr, past the harness's capture: the counts show in
    // every `cargo test` run.
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "powercut {name}: {} events ({} writes of <= 4 KiB, {} flushes); {} crash points, {} crash states ({} distinct) checked in {:.1} s",
        t.events,
        t.writes,
        t.flushes,
        t.points,
        t.states,
        t.distinct,
        start.elapsed().as_secs_f64()
    );
    (t, failures)
}

//------------------------------------------------------------------------------
// What metadata reads as

#[derive(Debug, Clone, PartialEq)]
enum Meta {
    /// No valid superblock.
    NoSuperblock,
    Pool {
        superblock: String,
        findings: Vec<String>,
        dump: String,
    },
}

impl Meta {
    fn passes(&self) -> bool {
        matches!(self, Meta::Pool { findings, .. } if findings.is_empty())
    }
}

fn meta_state(p: &Path, dump_to: &Path) -> Meta {
    // A file cut to nothing has no superblock either.
    let Ok(dev) = BlockDevice::open(p, OpenMode::ReadOnly) else {
        return Meta::NoSuperblock;
    };
    let Ok(sb) = read_superblock(&dev, 0) else {
        return Meta::NoSuperblock;
    };
    let rep = check(&dev, &CheckOptions::default(), &mut |_, _| {});
    drop(dev);
    let code = tool(&["thin_dump", s(p), "-o", s(dump_to)]);
    let dump = if code == 0 {
        std::fs::read_to_string(dump_to).unwrap()
    } else {
        format!("thin_dump exit {code}")
    };
    Meta::Pool {
        superblock: format!("{sb:?}"),
        findings: rep
            .findings
            .iter()
            .map(|f| format!("{}: {}", f.area, f.message))
            .collect(),
        dump,
    }
}

fn short(m: &Meta) -> String {
    match m {
        Meta::NoSuperblock => "no valid superblock".into(),
        Meta::Pool { findings, dump, .. } => format!(
            "findings {:?}, dump {}",
            findings.iter().take(3).collect::<Vec<_>>(),
            dump.lines().next().unwrap_or("")
        ),
    }
}

/// Run `args` (a writer of the metadata `meta`, which must succeed) under
/// the recorder, then replay it: every crash state must read exactly as
/// `meta` did before or after. `also_none`: a state with no valid
/// superblock is accepted too (a writer that documents it). `extra`:
/// files the writer must not write.
fn metadata_writer(
    name: &str,
    dir: &Path,
    meta: &Path,
    args: &[&str],
    read_only: &[&Path],
    also_none: bool,
    max_states: usize,
) -> Tried {
    metadata_writer_with(
        name,
        dir,
        meta,
        || tool_ok(args),
        read_only,
        also_none,
        max_states,
    )
}

/// As [`metadata_writer`], the writer being `run`.
fn metadata_writer_with(
    name: &str,
    dir: &Path,
    meta: &Path,
    run: impl FnOnce(),
    read_only: &[&Path],
    also_none: bool,
    max_states: usize,
) -> Tried {
    let dump_to = dir.join("state.xml");
    let old = meta_state(meta, &dump_to);
    let orig = vec![std::fs::read(meta).unwrap()];
    let mut files = vec![meta];
    files.extend_from_slice(read_only);
    let log = record(&files, run);
    assert!(
        log.iter().all(|e| e.file == 0),
        "{name}: wrote a file it only reads"
    );
    let new = meta_state(meta, &dump_to);
    assert!(new.passes(), "{name}: the result fails: {}", short(&new));
    assert_ne!(old, new, "{name}: changed nothing");
    assert!(
        log.iter().any(|e| e.op == Op::Flush),
        "{name}: never flushes"
    );
    let (t, failures) = old_or_new(
        name, &dump_to, meta, &orig, &log, &old, &new, also_none, max_states,
    );
    assert!(
        failures.is_empty(),
        "{name}: a power cut leaves a bad state:\n{}",
        failures.join("\n")
    );
    t
}

/// Replay `log` onto `meta` (bytes `orig` before): the failures of the
/// states that read neither as `old` nor as `new`.
#[allow(clippy::too_many_arguments)]
fn old_or_new(
    name: &str,
    dump_to: &Path,
    meta: &Path,
    orig: &[Vec<u8>],
    log: &[Event],
    old: &Meta,
    new: &Meta,
    also_none: bool,
    max_states: usize,
) -> (Tried, Vec<String>) {
    replay_failures(name, &[meta], orig, log, max_states, true, |_| {
        let got = meta_state(meta, dump_to);
        if &got == old || &got == new || (also_none && got == Meta::NoSuperblock) {
            Ok(())
        } else {
            Err(format!(
                "neither old nor new: {}\n  old: {}\n  new: {}",
                short(&got),
                short(old),
                short(new)
            ))
        }
    })
}

/// The model must see the faults it exists for: the same transaction with
/// the superblock written before the flush that makes its trees durable,
/// or with that flush left out, leaves states that are neither pool.
#[test]
fn the_model_catches_a_superblock_that_does_not_wait_for_the_flush() {
    let d = scratch();
    let dir = d.path();
    let p = kernel_meta(dir, "msg.img");
    let dump_to = dir.join("state.xml");
    let old = meta_state(&p, &dump_to);
    let orig = vec![std::fs::read(&p).unwrap()];
    let log = record(&[&p], || {
        tool_ok(&["thin_message", s(&p), "create_thin", "5"])
    });
    let new = meta_state(&p, &dump_to);
    let first_flush = log.iter().position(|e| e.op == Op::Flush).unwrap();
    let sb = log
        .iter()
        .rposition(|e| matches!(e.op, Op::Write { offset: 0, .. }))
        .unwrap();
    assert!(
        sb > first_flush,
        "the superblock is written after the flush"
    );

    let mut early = log.clone();
    let w = early.remove(sb);
    early.insert(first_flush, w);
    let mut unflushed = log.clone();
    unflushed.remove(first_flush);
    for (what, bad) in [("superblock first", early), ("no flush", unflushed)] {
        let (_, failures) = old_or_new(
            &format!("sabotaged: {what}"),
            &dump_to,
            &p,
            &orig,
            &bad,
            &old,
            &new,
            false,
            1000,
        );
        assert!(!failures.is_empty(), "{what}: not caught");
    }
}

fn kernel_meta(dir: &Path, name: &str) -> PathBuf {
    unpack(&fixture_dir().join("meta.img.gz"), dir, name)
}

/// A pool unlike kernel-small, written by thin_generate_metadata (4 MiB).
fn generated(dir: &Path, name: &str, seed_shape: &[&str]) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
    let mut args = vec!["thin_generate_metadata", "-q", "-o", s(&p)];
    args.extend_from_slice(seed_shape);
    tool_ok(&args);
    p
}

//------------------------------------------------------------------------------
// The writers

#[test]
fn thin_restore() {
    let d = scratch();
    let dir = d.path();
    // The new pool: a generated one, as XML.
    let gen = generated(
        dir,
        "gen.img",
        &[
            "--origins",
            "2",
            "--snaps",
            "1",
            "--segments",
            "60",
            "--writes",
            "40",
        ],
    );
    let xml = dir.join("gen.xml");
    tool_ok(&["thin_dump", s(&gen), "-o", s(&xml)]);
    // Over a valid pool (kernel-small) with room beside it: old or new.
    let meta = kernel_meta(dir, "meta.img");
    metadata_writer(
        "thin_restore over a pool",
        dir,
        &meta,
        &["thin_restore", "-q", "-i", s(&xml), "-o", s(&meta)],
        &[&xml],
        false,
        budget(600),
    );
    // No room beside the old pool (a 1 MiB device it nearly fills): the
    // old superblock is invalidated first (README, Safety), so a crash
    // leaves the old pool, no valid superblock, or the new pool.
    let full = dir.join("full.img");
    std::fs::File::create(&full)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    tool_ok(&[
        "thin_generate_metadata",
        "-q",
        "-o",
        s(&full),
        "--origins",
        "2",
        "--snaps",
        "1",
        "--segments",
        "60",
        "--writes",
        "40",
    ]);
    let small = generated(
        dir,
        "small.img",
        &[
            "--origins",
            "1",
            "--snaps",
            "1",
            "--segments",
            "20",
            "--writes",
            "10",
        ],
    );
    let small_xml = dir.join("small.xml");
    tool_ok(&["thin_dump", s(&small), "-o", s(&small_xml)]);
    let t = metadata_writer(
        "thin_restore with no room beside the old pool",
        dir,
        &full,
        &["thin_restore", "-q", "-i", s(&small_xml), "-o", s(&full)],
        &[&small_xml],
        true,
        budget(300),
    );
    assert!(
        t.first_write_at_0,
        "the old superblock is not invalidated first"
    );
    // Over a zeroed device: nothing or the new pool.
    let zero = dir.join("zero.img");
    std::fs::File::create(&zero)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    metadata_writer(
        "thin_restore over zeros",
        dir,
        &zero,
        &["thin_restore", "-q", "-i", s(&xml), "-o", s(&zero)],
        &[&xml],
        false,
        budget(200),
    );
}

#[test]
fn thin_repair() {
    let d = scratch();
    let dir = d.path();
    let input = kernel_meta(dir, "in.img");
    // The output holds another valid pool, which a crash must leave whole.
    let out = generated(
        dir,
        "out.img",
        &[
            "--origins",
            "1",
            "--snaps",
            "1",
            "--segments",
            "20",
            "--writes",
            "10",
        ],
    );
    metadata_writer(
        "thin_repair",
        dir,
        &out,
        &["thin_repair", "-q", "-i", s(&input), "-o", s(&out)],
        &[&input],
        false,
        budget(150),
    );
}

/// kernel-small with its space maps rewritten to count `meta_leaks` and
/// `data_leaks` (free blocks) as used, and the flags `flags`.
fn leaky(dir: &Path, name: &str, meta_leaks: &[u64], data_leaks: &[u64], flags: u32) -> PathBuf {
    let p = kernel_meta(dir, name);
    let dev = retry_busy(|| BlockDevice::open(&p, OpenMode::ReadWriteExclusive)).unwrap();
    let opts = CheckOptions {
        keep_counts: true,
        ..Default::default()
    };
    let rep = check(&dev, &opts, &mut |_, _| {});
    assert!(rep.findings.is_empty(), "{:?}", rep.findings);
    let sb = rep.superblock.unwrap();
    let mut counts = rep.counts.unwrap();
    for &b in meta_leaks {
        assert_eq!(counts.metadata.get(b), 0);
        counts.metadata.inc(b);
    }
    for &b in data_leaks {
        assert_eq!(counts.data.get(b), 0);
        counts.data.inc(b);
    }
    rebuild_space_maps(&dev, &sb, counts, flags).unwrap();
    p
}

#[test]
fn thin_check_auto_repair_and_clear_needs_check() {
    let d = scratch();
    let dir = d.path();
    let p = leaky(dir, "leaks.img", &[700, 701], &[200, 201], 0);
    metadata_writer(
        "thin_check --auto-repair",
        dir,
        &p,
        &["thin_check", "-q", "--auto-repair", s(&p)],
        &[],
        false,
        budget(100),
    );
    let p = leaky(dir, "flag.img", &[], &[], NEEDS_CHECK_FLAG);
    metadata_writer(
        "thin_check --clear-needs-check-flag",
        dir,
        &p,
        &["thin_check", "-q", "--clear-needs-check-flag", s(&p)],
        &[],
        false,
        budget(20),
    );
    // LVM's default on leaks with needs_check set: frees them and clears it.
    let p = leaky(dir, "both.img", &[700], &[200], NEEDS_CHECK_FLAG);
    metadata_writer(
        "thin_check -q --clear-needs-check-flag (leaks)",
        dir,
        &p,
        &["thin_check", "-q", "--clear-needs-check-flag", s(&p)],
        &[],
        false,
        budget(100),
    );
}

#[test]
fn thin_message_every_message() {
    let d = scratch();
    let dir = d.path();
    for words in [
        "create_thin 5",
        "create_snap 6 1",
        "delete 1",
        "set_transaction_id 5 6",
        "release_metadata_snap",
        "reserve_metadata_snap",
    ] {
        let p = kernel_meta(dir, "msg.img");
        if words == "reserve_metadata_snap" {
            tool_ok(&["thin_message", s(&p), "release_metadata_snap"]);
        }
        let mut args = vec!["thin_message", s(&p)];
        args.extend(words.split_whitespace());
        metadata_writer(
            &format!("thin_message {words}"),
            dir,
            &p,
            &args,
            &[],
            false,
            budget(100),
        );
    }
}

#[test]
fn thin_merge_into_thin() {
    let d = scratch();
    let dir = d.path();
    let p = kernel_meta(dir, "m.img");
    metadata_writer(
        "thin_merge --into-thin",
        dir,
        &p,
        &[
            "thin_merge",
            "-q",
            "--metadata",
            s(&p),
            "--dev-id",
            "2",
            "--into-thin",
            "1",
        ],
        &[],
        false,
        budget(100),
    );
}

#[test]
fn thin_metadata_unpack() {
    let d = scratch();
    let dir = d.path();
    let pack = repo().join("tests/data/pack/kernel-small.pack");
    // Over another pool: the image is rewritten in place (block 0 cleared
    // first, written last), so a crash leaves the old pool, no superblock
    // or the new one (thin_metadata_unpack.8).
    let out = generated(
        dir,
        "out.img",
        &[
            "--origins",
            "1",
            "--snaps",
            "1",
            "--segments",
            "20",
            "--writes",
            "10",
        ],
    );
    metadata_writer(
        "thin_metadata_unpack",
        dir,
        &out,
        &[
            "thin_metadata_unpack",
            "-q",
            "-f",
            "-i",
            s(&pack),
            "-o",
            s(&out),
        ],
        &[&pack],
        true,
        budget(300),
    );
}

/// The block-device path of the unpack (no size change: the blocks the pack
/// lacks are zeroed, block 0 first), through the library on a file of a
/// device's size.
#[test]
fn thin_metadata_unpack_onto_a_block_device() {
    use thinmeta::pdata::pack::{validate, write_image};
    let d = scratch();
    let dir = d.path();
    let pack = repo().join("tests/data/pack/kernel-small.pack");
    let out = generated(
        dir,
        "out.img",
        &[
            "--origins",
            "1",
            "--snaps",
            "1",
            "--segments",
            "20",
            "--writes",
            "10",
        ],
    );
    let t = metadata_writer_with(
        "thin_metadata_unpack (block device)",
        dir,
        &out,
        || {
            let f = std::fs::File::open(&pack).unwrap();
            let len = f.metadata().unwrap().len();
            let v = validate(&f, len, &mut |_, _| {}).unwrap();
            let o = open_rw(&out);
            write_image(&f, len, &v, &o, 4 << 20, true, &mut |_, _| {}).unwrap();
        },
        &[&pack],
        true,
        budget(300),
    );
    assert!(t.first_write_at_0, "block 0 is not cleared first");
}

//------------------------------------------------------------------------------
// Data writers: a rerun completes to the uninterrupted result

/// Record `run` writing `files`, then at each crash state rerun it: the
/// files must end as after the uninterrupted run.
fn rerun_writer(
    name: &str,
    files: &[&Path],
    read_only: &[&Path],
    run: impl Fn() -> i32,
    max_states: usize,
) -> Tried {
    let orig: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let ro: Vec<Vec<u8>> = read_only
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .collect();
    let log = record(files, || assert_eq!(run(), 0, "{name}"));
    let done: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_ne!(orig, done, "{name}: changed nothing");
    // Again on the result: nothing changes (a merge is idempotent).
    assert_eq!(run(), 0, "{name}: a second run");
    for (p, want) in files.iter().zip(&done) {
        assert!(&std::fs::read(p).unwrap() == want, "{name}: rerun differs");
    }
    replay(name, files, &orig, &log, max_states, false, |_| {
        let code = run();
        if code != 0 {
            return Err(format!("the rerun exits {code}"));
        }
        for (i, (p, want)) in files.iter().zip(&done).enumerate() {
            if &std::fs::read(p).unwrap() != want {
                return Err(format!("file {i} differs from the uninterrupted result"));
            }
        }
        Ok(())
    });
    for (p, want) in read_only.iter().zip(&ro) {
        assert!(&std::fs::read(p).unwrap() == want, "{name}: wrote {p:?}");
    }
    Tried::default()
}

#[test]
fn thin_merge_into_the_external_origin() {
    let d = scratch();
    let dir = d.path();
    let meta = kernel_meta(dir, "meta.img");
    let data = unpack(&fixture_dir().join("data.img.gz"), dir, "data.img");
    let origin = dir.join("origin.img");
    let mut o = vec![0u8; 8 << 20];
    for (i, c) in o.chunks_mut(512).enumerate() {
        c[..8].copy_from_slice(&(i as u64 ^ 0x6f72_6967).to_le_bytes());
    }
    std::fs::write(&origin, &o).unwrap();
    rerun_writer(
        "thin_merge --origin",
        &[&origin],
        &[&meta, &data],
        || {
            tool(&[
                "thin_merge",
                "-q",
                "--metadata",
                s(&meta),
                "--data",
                s(&data),
                "--dev-id",
                "1",
                "--origin",
                s(&origin),
            ])
        },
        budget(150),
    );
}

#[test]
fn thin_shrink() {
    let d = scratch();
    let dir = d.path();
    let meta = kernel_meta(dir, "meta.img");
    let data = unpack(&fixture_dir().join("data.img.gz"), dir, "data.img");
    // A held metadata snapshot is refused: release it; deleting device 2
    // leaves holes below blocks in use, so blocks move.
    tool_ok(&["thin_message", s(&meta), "release_metadata_snap"]);
    tool_ok(&["thin_message", s(&meta), "delete", "2"]);
    let used: Vec<u64> = {
        let dev = BlockDevice::open(&meta, OpenMode::ReadOnly).unwrap();
        let opts = CheckOptions {
            keep_counts: true,
            ..Default::default()
        };
        let rep = check(&dev, &opts, &mut |_, _| {});
        assert!(rep.findings.is_empty());
        let c = rep.counts.unwrap();
        (0..256).filter(|&b| c.data.get(b) > 0).collect()
    };
    let n = used.len() as u64;
    assert!(
        used.iter().any(|&b| b >= n),
        "kernel-small has blocks to move"
    );
    let out = dir.join("out.img");
    std::fs::File::create(&out)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let bb = 64 << 10;
    let devices = [(1u64, 8u64 << 20), (3, 4 << 20), (4, 4 << 20)];
    let extract = |m: &Path, id: u64, bytes: u64| -> Vec<u8> {
        let to = dir.join("dev.bin");
        let (id, bytes) = (id.to_string(), bytes.to_string());
        let args = [
            "thin_extract",
            "-q",
            "--metadata",
            s(m),
            "--data",
            s(&data),
            "--dev-id",
            &id,
            "--size",
            &bytes,
            "-o",
            s(&to),
        ];
        tool_ok(&args);
        std::fs::read(&to).unwrap()
    };
    let contents: Vec<Vec<u8>> = devices.iter().map(|&(i, b)| extract(&meta, i, b)).collect();
    let orig_data = std::fs::read(&data).unwrap();
    let orig = vec![orig_data.clone(), std::fs::read(&out).unwrap()];
    let nstr = n.to_string();
    let args = [
        "thin_shrink",
        "-q",
        "-i",
        s(&meta),
        "-o",
        s(&out),
        "--data",
        s(&data),
        "--nr-blocks",
        &nstr,
        "--binary",
    ];
    let meta_bytes = std::fs::read(&meta).unwrap();
    let log = record(&[&data, &out, &meta], || tool_ok(&args));
    assert!(log.iter().all(|e| e.file != 2), "wrote its input metadata");
    assert!(log.iter().any(|e| e.file == 0), "moved no data");
    let dump_to = dir.join("state.xml");
    let new = meta_state(&out, &dump_to);
    assert!(new.passes(), "{}", short(&new));
    replay(
        "thin_shrink --binary (data copy and metadata)",
        &[&data, &out],
        &orig,
        &log,
        budget(150),
        true,
        |imgs| {
            // The input pool reads every block it maps unchanged.
            let now = &imgs[0];
            for &b in &used {
                let r = (b * bb) as usize..((b + 1) * bb) as usize;
                if now[r.clone()] != orig_data[r] {
                    return Err(format!("data block {b}, mapped by the input, was changed"));
                }
            }
            match meta_state(&out, &dump_to) {
                Meta::NoSuperblock => Ok(()),
                got if got == new => {
                    for (&(id, bytes), want) in devices.iter().zip(&contents) {
                        if &extract(&out, id, bytes) != want {
                            return Err(format!(
                                "device {id} reads differently through the new metadata"
                            ));
                        }
                    }
                    Ok(())
                }
                got => Err(format!("output neither old nor new: {}", short(&got))),
            }
        },
    );
    assert!(std::fs::read(&meta).unwrap() == meta_bytes);

    // XML to XML: only the data copy writes a device (the new XML is a new
    // file); the input's blocks must survive every crash.
    std::fs::write(&data, &orig_data).unwrap();
    let xml = dir.join("in.xml");
    tool_ok(&["thin_dump", s(&meta), "-o", s(&xml)]);
    let out_xml = dir.join("out.xml");
    let args = [
        "thin_shrink",
        "-q",
        "-i",
        s(&xml),
        "-o",
        s(&out_xml),
        "--data",
        s(&data),
        "--nr-blocks",
        &nstr,
    ];
    let log = record(&[&data, &xml], || tool_ok(&args));
    assert!(log.iter().all(|e| e.file == 0), "wrote its input XML");
    assert!(
        log.iter().any(|e| e.op == Op::Flush),
        "never flushes the data"
    );
    replay(
        "thin_shrink (XML; data copy)",
        &[&data],
        &orig[..1],
        &log,
        budget(150),
        true,
        |imgs| {
            for &b in &used {
                let r = (b * bb) as usize..((b + 1) * bb) as usize;
                if imgs[0][r.clone()] != orig_data[r] {
                    return Err(format!("data block {b}, mapped by the input, was changed"));
                }
            }
            Ok(())
        },
    );
}

//------------------------------------------------------------------------------
// snap_merge, on a store built from the format (FORMATS.md §8)

const SNAP_MAGIC: u32 = 0x7041_6e53;

/// "TAG<n>.<k> " repeated: every 16 bytes differ between chunks.
fn fill(buf: &mut [u8], tag: &str, n: u64) {
    let mut pos = 0;
    let mut k = 0u64;
    while pos < buf.len() {
        let t = format!("{tag}{n}.{k} ");
        let take = t.len().min(buf.len() - pos);
        buf[pos..pos + take].copy_from_slice(&t.as_bytes()[..take]);
        pos += take;
        k += 1;
    }
}

/// A persistent COW store of `chunk`-byte chunks whose exceptions copy
/// the origin chunks `olds`, in the kernel's allocation order (chunks from
/// 2, skipping metadata areas), each data chunk filled with its own text.
fn cow_store(chunk: usize, olds: &[u64]) -> Vec<u8> {
    let epa = chunk / 16;
    let is_area = |c: u64| c % (epa as u64 + 1) == 1;
    let mut news = Vec::new();
    let mut next = 2u64;
    while news.len() < olds.len() {
        if is_area(next) {
            next += 1;
        }
        news.push(next);
        next += 1;
    }
    // Room for the next area (where the table ends) after the last chunk.
    let nr_chunks = next as usize + epa + 2;
    let mut b = vec![0u8; nr_chunks * chunk];
    for c in 2..nr_chunks {
        if !is_area(c as u64) {
            fill(&mut b[c * chunk..(c + 1) * chunk], "cow", c as u64);
        }
    }
    for (i, v) in [SNAP_MAGIC, 1, 1, (chunk / 512) as u32].iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    for (i, (&old, &new)) in olds.iter().zip(&news).enumerate() {
        let off = (1 + (epa + 1) * (i / epa)) * chunk + (i % epa) * 16;
        b[off..off + 8].copy_from_slice(&old.to_le_bytes());
        b[off + 8..off + 16].copy_from_slice(&new.to_le_bytes());
    }
    b
}

#[test]
fn snap_merge() {
    let d = scratch();
    let dir = d.path();
    let chunk = 512;
    // Runs and scattered chunks over three metadata areas (32 a chunk).
    let mut olds: Vec<u64> = (0..20).chain(30..34).collect();
    olds.extend((40..120).filter(|c| c % 3 != 0));
    olds.push(7 + 200);
    olds.extend([150, 151, 152, 199, 25]);
    let origin = dir.join("origin.img");
    let cow = dir.join("cow.img");
    let mut o = vec![0u8; 210 * chunk];
    for (i, c) in o.chunks_mut(chunk).enumerate() {
        fill(c, "org", i as u64);
    }
    std::fs::write(&origin, &o).unwrap();
    std::fs::write(&cow, cow_store(chunk, &olds)).unwrap();
    rerun_writer(
        "snap_merge",
        &[&origin, &cow],
        &[],
        || tool(&["snap_merge", "--origin", s(&origin), "--cow", s(&cow)]),
        budget(900),
    );
}
