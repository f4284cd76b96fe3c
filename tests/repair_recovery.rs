//! What thin_repair and thin_dump --repair recover when the superblock, the
//! device-details tree or both are lost: the transaction id, nr_data_blocks,
//! the pool time and the rebuilt devices' times, so that the kernel sees
//! every mapping two devices share as shared (a mapping is shared iff its
//! time is below its device's snap_time) and LVM accepts the pool.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;

const BLOCK: u64 = 4096;

/// The superblock and devices of a dump, every mapping expanded.
#[derive(Debug, Default)]
struct Pool {
    sb: BTreeMap<String, String>,
    /// dev id -> attributes of its `<device>` line
    devs: BTreeMap<u64, BTreeMap<String, String>>,
    /// dev id -> (virtual block, data block, time)
    maps: BTreeMap<u64, Vec<(u64, u64, u32)>>,
}

fn attrs(line: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = line;
    while let Some(eq) = rest.find("=\"") {
        let key = rest[..eq].rsplit(' ').next().unwrap().to_string();
        let after = &rest[eq + 2..];
        let end = after.find('"').unwrap();
        out.insert(key, after[..end].to_string());
        rest = &after[end + 1..];
    }
    out
}

fn num(a: &BTreeMap<String, String>, k: &str) -> u64 {
    a[k].parse().unwrap()
}

fn parse(xml: &str) -> Pool {
    let mut pool = Pool::default();
    let mut defs: BTreeMap<String, Vec<(u64, u64, u32)>> = BTreeMap::new();
    let mut cur: Option<Vec<(u64, u64, u32)>> = None;
    let mut def: Option<String> = None;
    let mut dev: Option<u64> = None;
    for l in xml.lines().map(str::trim) {
        let a = attrs(l);
        if l.starts_with("<superblock") {
            pool.sb = a;
        } else if l.starts_with("<def") {
            def = Some(a["name"].clone());
            cur = Some(Vec::new());
        } else if l.starts_with("</def") {
            defs.insert(def.take().unwrap(), cur.take().unwrap());
        } else if l.starts_with("<device") {
            let id = num(&a, "dev_id");
            pool.devs.insert(id, a);
            dev = Some(id);
            cur = Some(Vec::new());
        } else if l.starts_with("</device") {
            pool.maps.insert(dev.take().unwrap(), cur.take().unwrap());
        } else if l.starts_with("<ref") {
            cur.as_mut()
                .unwrap()
                .extend(defs[&a["name"]].iter().copied());
        } else if l.starts_with("<range_mapping") {
            let (o, d, n) = (
                num(&a, "origin_begin"),
                num(&a, "data_begin"),
                num(&a, "length"),
            );
            let t = num(&a, "time") as u32;
            cur.as_mut()
                .unwrap()
                .extend((0..n).map(|i| (o + i, d + i, t)));
        } else if l.starts_with("<single_mapping") {
            cur.as_mut().unwrap().push((
                num(&a, "origin_block"),
                num(&a, "data_block"),
                num(&a, "time") as u32,
            ));
        }
    }
    pool
}

impl Pool {
    fn sb(&self, k: &str) -> u64 {
        num(&self.sb, k)
    }
    fn dev(&self, id: u64, k: &str) -> u64 {
        num(&self.devs[&id], k)
    }

    /// What the kernel needs of a repaired pool: every mapping whose data
    /// block another device also maps lies below its device's snap_time;
    /// the pool time is at least every time written (above it when
    /// `strictly`, as when a device's details were rebuilt) and every device time.
    fn assert_kernel_safe(&self, strictly: bool) {
        let mut holders: BTreeMap<u64, usize> = BTreeMap::new();
        for m in self.maps.values() {
            let mut blocks: Vec<u64> = m.iter().map(|x| x.1).collect();
            blocks.sort_unstable();
            blocks.dedup();
            for b in blocks {
                *holders.entry(b).or_default() += 1;
            }
        }
        let time = self.sb("time");
        for (&id, m) in &self.maps {
            let snap = self.dev(id, "snap_time");
            assert!(
                snap <= time,
                "device {id}: snap_time {snap} > pool time {time}"
            );
            assert!(self.dev(id, "creation_time") <= time);
            for &(v, d, t) in m {
                if holders[&d] > 1 {
                    assert!(
                        (t as u64) < snap,
                        "device {id} block {v}: data block {d} is shared but its time {t} >= snap_time {snap}: the kernel would overwrite it in place"
                    );
                }
                if strictly {
                    assert!((t as u64) < time, "mapping time {t} >= pool time {time}");
                } else {
                    assert!((t as u64) <= time, "mapping time {t} > pool time {time}");
                }
            }
        }
    }

    /// The mappings (virtual, data) of each device, times left out.
    fn blocks(&self) -> BTreeMap<u64, Vec<(u64, u64)>> {
        self.maps
            .iter()
            .map(|(&id, m)| (id, m.iter().map(|x| (x.0, x.1)).collect()))
            .collect()
    }
}

fn dump(img: &Path, extra: &[&str]) -> String {
    let mut args = extra.to_vec();
    args.push(img.to_str().unwrap());
    let out = run("thin_dump", &args);
    assert!(
        out.status.success(),
        "thin_dump {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn zero_block(img: &Path, b: u64) {
    use std::os::unix::fs::FileExt;
    open_rw(img)
        .write_all_at(&[0u8; BLOCK as usize], b * BLOCK)
        .unwrap();
}

/// The superblock field at byte `off` (320: mapping root, 328: details root).
fn sb_u64(img: &Path, off: usize) -> u64 {
    let b = std::fs::read(img).unwrap();
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

fn blank(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
    p
}

/// thin_repair into a fresh output; its dump (and stderr) on success.
fn repair(input: &Path, dir: &Path, extra: &[&str]) -> (Pool, String) {
    let out = blank(dir, "out.img");
    let mut args = vec!["-i", input.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let r = run("thin_repair", &args);
    let err = String::from_utf8_lossy(&r.stderr).to_string();
    assert!(r.status.success(), "thin_repair {extra:?}: {err}");
    let ck = run("thin_check", &[out.to_str().unwrap()]);
    assert!(
        ck.status.success(),
        "thin_check of the repaired pool: {}",
        String::from_utf8_lossy(&ck.stderr)
    );
    let xml = dump(&out, &[]);
    // thin_dump --repair recovers the same pool.
    let mut dargs = vec!["--repair"];
    dargs.extend_from_slice(extra);
    assert_eq!(
        parse(&dump(input, &dargs)).blocks(),
        parse(&xml).blocks(),
        "thin_dump --repair {extra:?}"
    );
    let d = parse(&dump(input, &dargs));
    assert_eq!(d.sb, parse(&xml).sb, "thin_dump --repair {extra:?}");
    assert_eq!(d.devs, parse(&xml).devs, "thin_dump --repair {extra:?}");
    (parse(&xml), err)
}

/// Origin 1 and its snapshot 2 share data blocks 0-99 (written at time 0,
/// snapshot at time 1); origin 1 then wrote virtual block 200 to data block
/// 150 (time 1, private). Pool: time 1, transaction 3, 1024 data blocks.
fn origin_and_snapshot(dir: &Path) -> PathBuf {
    let shared: String = (0..100)
        .map(|i| {
            format!("      <single_mapping origin_block=\"{i}\" data_block=\"{i}\" time=\"0\"/>\n")
        })
        .collect();
    let xml = format!(
        "<superblock uuid=\"\" time=\"1\" transaction=\"3\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"1024\">\n\
         \x20 <device dev_id=\"1\" mapped_blocks=\"101\" transaction=\"1\" creation_time=\"0\" snap_time=\"1\">\n\
         {shared}\
         \x20     <single_mapping origin_block=\"200\" data_block=\"150\" time=\"1\"/>\n\
         \x20 </device>\n\
         \x20 <device dev_id=\"2\" mapped_blocks=\"100\" transaction=\"2\" creation_time=\"1\" snap_time=\"1\">\n\
         {shared}\
         \x20 </device>\n</superblock>\n"
    );
    let x = dir.join("pool.xml");
    std::fs::write(&x, xml).unwrap();
    let img = blank(dir, "meta.img");
    let r = run(
        "thin_restore",
        &["-i", x.to_str().unwrap(), "-o", img.to_str().unwrap()],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    img
}

#[test]
fn superblock_lost_recovers_transaction_nr_data_blocks_and_time() {
    let t = tempfile::tempdir().unwrap();
    let img = origin_and_snapshot(t.path());
    let want = parse(&dump(&img, &[]));
    zero_block(&img, 0);
    let (got, notes) = repair(&img, t.path(), &["--data-block-size", "128"]);
    // The highest device transaction id (2) + 1; the highest mapped data
    // block (150) + 1; the latest time the surviving details and mappings
    // carry (1: every device keeps its snap_time, so nothing shared is seen
    // as private; the original gives the same).
    assert_eq!(got.sb("transaction"), 3);
    assert_eq!(got.sb("nr_data_blocks"), 151);
    assert_eq!(got.sb("time"), 1);
    assert_eq!(got.sb("data_block_size"), 128);
    // The details survived: kept as they were.
    assert_eq!(got.devs, want.devs);
    assert_eq!(got.blocks(), want.blocks());
    got.assert_kernel_safe(false);
    assert!(notes.contains("nr_data_blocks 151 = the highest mapped data block + 1"));
    assert!(notes.contains("transaction id 3 = the highest device transaction id + 1"));

    // What the user gives wins.
    let (got, _) = repair(
        &img,
        t.path(),
        &[
            "--data-block-size",
            "256",
            "--nr-data-blocks",
            "4096",
            "--transaction-id",
            "9",
        ],
    );
    assert_eq!(got.sb("transaction"), 9);
    assert_eq!(got.sb("nr_data_blocks"), 4096);
    assert_eq!(got.sb("data_block_size"), 256);
    assert_eq!(got.sb("time"), 1);
}

#[test]
fn details_lost_devices_are_rebuilt_with_every_shared_mapping_shared() {
    let t = tempfile::tempdir().unwrap();
    let img = origin_and_snapshot(t.path());
    let want = parse(&dump(&img, &[]));
    zero_block(&img, sb_u64(&img, 328));
    let (got, notes) = repair(&img, t.path(), &[]);
    // The superblock survived: its values are the kernel's own, but the
    // pool time goes one above the latest time seen (1), as the original
    // does, so that every mapping of a rebuilt device is treated as shared.
    // A rebuilt device's transaction id is the pool's - 1 (as if created in
    // the last transaction), so a later repair without superblock gives 3.
    assert_eq!(got.sb("transaction"), 3);
    assert_eq!(got.sb("nr_data_blocks"), 1024);
    assert_eq!(got.sb("time"), 2);
    for id in [1, 2] {
        assert_eq!(got.dev(id, "creation_time"), 2, "device {id}");
        assert_eq!(got.dev(id, "snap_time"), 2, "device {id}");
        assert_eq!(got.dev(id, "transaction"), 2, "device {id}");
    }
    assert_eq!(got.dev(1, "mapped_blocks"), 101);
    assert_eq!(got.dev(2, "mapped_blocks"), 100);
    assert_eq!(got.blocks(), want.blocks());
    got.assert_kernel_safe(false);
    assert!(
        notes.contains("details of device(s) 1, 2 rebuilt"),
        "{notes}"
    );
}

#[test]
fn superblock_and_details_lost_the_shared_blocks_stay_shared() {
    // The data-safety case: with time 0 and snap_time 0 the kernel would
    // take blocks 0-99 for device 1's own and overwrite them in place,
    // changing the snapshot.
    let t = tempfile::tempdir().unwrap();
    let img = origin_and_snapshot(t.path());
    let want = parse(&dump(&img, &[]));
    zero_block(&img, sb_u64(&img, 328));
    zero_block(&img, 0);
    let (got, notes) = repair(&img, t.path(), &["--data-block-size", "128"]);
    assert_eq!(got.sb("time"), 2);
    assert_eq!(got.sb("nr_data_blocks"), 151);
    for id in [1, 2] {
        assert_eq!(got.dev(id, "creation_time"), 2, "device {id}");
        assert_eq!(got.dev(id, "snap_time"), 2, "device {id}");
    }
    assert_eq!(got.blocks(), want.blocks());
    got.assert_kernel_safe(true);
    // No transaction id survived anywhere: 0, and the user is told.
    assert_eq!(got.sb("transaction"), 0);
    assert!(notes.contains("give --transaction-id"), "{notes}");
    let (got, _) = repair(
        &img,
        t.path(),
        &["--data-block-size", "128", "--transaction-id", "3"],
    );
    assert_eq!(got.sb("transaction"), 3);
    assert_eq!(got.dev(1, "transaction"), 2);
}

#[test]
fn stale_details_are_raised_above_the_mappings_they_share() {
    // Origin 1 (blocks 0-99 at time 0, snap_time 0); the metadata snapshot
    // is taken; then snapshot 2 of 1. With the live details tree lost,
    // device 1's details come from the metadata snapshot, where its
    // snap_time is still 0: kept as is, the kernel would see blocks 0-99 as
    // device 1's own although device 2 maps them.
    let t = tempfile::tempdir().unwrap();
    let maps: String = (0..100)
        .map(|i| {
            format!("      <single_mapping origin_block=\"{i}\" data_block=\"{i}\" time=\"0\"/>\n")
        })
        .collect();
    let xml = format!(
        "<superblock uuid=\"\" time=\"0\" transaction=\"1\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"1024\">\n\
         \x20 <device dev_id=\"1\" mapped_blocks=\"100\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n\
         {maps}\x20 </device>\n</superblock>\n"
    );
    let x = t.path().join("one.xml");
    std::fs::write(&x, xml).unwrap();
    let img = blank(t.path(), "meta.img");
    let p = img.to_str().unwrap();
    assert!(run("thin_restore", &["-i", x.to_str().unwrap(), "-o", p])
        .status
        .success());
    for m in [&["reserve_metadata_snap"][..], &["create_snap", "2", "1"]] {
        let mut args = vec![p];
        args.extend_from_slice(m);
        let r = run("thin_message", &args);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    }
    let before = parse(&dump(&img, &[]));
    assert_eq!(before.dev(1, "snap_time"), 1);
    zero_block(&img, sb_u64(&img, 328));
    let (got, notes) = repair(&img, t.path(), &[]);
    assert!(
        notes.contains("taken from the metadata snapshot"),
        "{notes}"
    );
    assert!(
        notes.contains("device 1: snap_time 0 raised to 1"),
        "{notes}"
    );
    assert_eq!(got.dev(1, "snap_time"), 1);
    assert_eq!(got.dev(1, "creation_time"), 0);
    assert_eq!(got.dev(2, "snap_time"), 1);
    assert_eq!(got.blocks(), before.blocks());
    got.assert_kernel_safe(false);
}

#[test]
fn kernel_pool_without_superblock_needs_no_options() {
    // kernel-small holds a metadata snapshot: its superblock copy gives the
    // block size and the transaction id; the time is the latest seen (2, the
    // kernel's own);
    // nr_data_blocks is the highest mapped block + 1 (the kernel zeroes the
    // copy's space map roots, and grows the pool to its data device when it
    // activates it).
    let t = tempfile::tempdir().unwrap();
    let img = unpack(&fixture_dir().join("meta.img.gz"), t.path(), "meta.img");
    let want = parse(&dump(&img, &[]));
    zero_block(&img, 0);
    let (got, notes) = repair(&img, t.path(), &[]);
    assert_eq!(got.sb("data_block_size"), 128);
    assert_eq!(got.sb("transaction"), 5);
    assert_eq!(got.sb("time"), want.sb("time"));
    assert_eq!(got.sb("time"), 2);
    let highest = want
        .maps
        .values()
        .flat_map(|m| m.iter().map(|x| x.1))
        .max()
        .unwrap();
    assert_eq!(got.sb("nr_data_blocks"), highest + 1);
    assert_eq!(got.devs, want.devs);
    assert_eq!(got.blocks(), want.blocks());
    got.assert_kernel_safe(false);
    assert!(
        notes.contains("metadata snapshot's superblock copy"),
        "{notes}"
    );
}

#[test]
fn without_any_superblock_only_the_block_size_must_be_given() {
    let t = tempfile::tempdir().unwrap();
    let img = origin_and_snapshot(t.path());
    zero_block(&img, 0);
    let out = blank(t.path(), "out.img");
    let r = run(
        "thin_repair",
        &["-i", img.to_str().unwrap(), "-o", out.to_str().unwrap()],
    );
    assert_one_line_error(&r, "no block size");
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("--data-block-size"), "{err}");
    assert!(!err.contains("--nr-data-blocks"), "{err}");
    // Nothing was written.
    assert!(std::fs::read(&out).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn intact_metadata_is_repaired_unchanged() {
    // Nothing lost: no value is made up.
    let t = tempfile::tempdir().unwrap();
    let img = origin_and_snapshot(t.path());
    let want = parse(&dump(&img, &[]));
    let (got, _) = repair(&img, t.path(), &[]);
    assert_eq!(got.sb, want.sb);
    assert_eq!(got.devs, want.devs);
    assert_eq!(got.maps, want.maps);
}

#[test]
fn data_blocks_shared_from_distinct_leaves_are_found() {
    // Devices 1 and 2 map data blocks 0-99 from leaves of their own (as
    // after the kernel copied a shared leaf); device 1's details say
    // snap_time 0, as a stale details tree would. Device 3 maps blocks of
    // its own at time 0 with snap_time 0: nothing of it is shared, so it
    // keeps its details.
    let t = tempfile::tempdir().unwrap();
    let maps = |first: u64| -> String {
        (0..100)
            .map(|i| {
                format!(
                    "      <single_mapping origin_block=\"{i}\" data_block=\"{}\" time=\"0\"/>\n",
                    first + i
                )
            })
            .collect()
    };
    let xml = format!(
        "<superblock uuid=\"\" time=\"1\" transaction=\"4\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"1024\">\n\
         \x20 <device dev_id=\"1\" mapped_blocks=\"100\" transaction=\"1\" creation_time=\"0\" snap_time=\"0\">\n{}\x20 </device>\n\
         \x20 <device dev_id=\"2\" mapped_blocks=\"100\" transaction=\"2\" creation_time=\"1\" snap_time=\"1\">\n{}\x20 </device>\n\
         \x20 <device dev_id=\"3\" mapped_blocks=\"100\" transaction=\"3\" creation_time=\"0\" snap_time=\"0\">\n{}\x20 </device>\n\
         </superblock>\n",
        maps(0),
        maps(0),
        maps(500)
    );
    let x = t.path().join("pool.xml");
    std::fs::write(&x, xml).unwrap();
    let img = blank(t.path(), "meta.img");
    let r = run(
        "thin_restore",
        &["-i", x.to_str().unwrap(), "-o", img.to_str().unwrap()],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let xml = dump(&img, &[]);
    assert!(!xml.contains("<def"), "the test needs distinct leaves");
    zero_block(&img, 0);
    let (got, notes) = repair(&img, t.path(), &["--data-block-size", "128"]);
    assert!(
        notes.contains("device 1: snap_time 0 raised to 1"),
        "{notes}"
    );
    assert!(!notes.contains("device 3"), "{notes}");
    assert_eq!(got.dev(1, "snap_time"), 1);
    assert_eq!(got.dev(2, "snap_time"), 1);
    assert_eq!(got.dev(3, "snap_time"), 0);
    assert_eq!(got.sb("time"), 1);
    assert_eq!(got.sb("transaction"), 4);
    assert_eq!(got.sb("nr_data_blocks"), 600);
    got.assert_kernel_safe(true);
}

/// Change btree node `b` of `img` with `f`, then re-seal its checksum.
fn patch_node(img: &Path, b: u64, f: impl FnOnce(&mut [u8])) {
    use std::os::unix::fs::FileExt;
    use thinmeta::pdata::checksum::{seal, BlockKind};
    let file = open_rw(img);
    let mut buf = vec![0u8; BLOCK as usize];
    file.read_exact_at(&mut buf, b * BLOCK).unwrap();
    f(&mut buf);
    seal(&mut buf, BlockKind::BTreeNode);
    file.write_all_at(&buf, b * BLOCK).unwrap();
}

fn le64_at(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}

/// Value `i` of a node with 8-byte values (key area of 252 entries).
const VALUES: usize = 32 + 8 * 252;

/// Device id -> mapping-tree root, from the top-level leaf.
fn device_roots(img: &Path) -> BTreeMap<u64, u64> {
    let bytes = std::fs::read(img).unwrap();
    let top = sb_u64(img, 320) as usize * BLOCK as usize;
    let node = &bytes[top..top + BLOCK as usize];
    let nr = u32::from_le_bytes(node[16..20].try_into().unwrap()) as usize;
    (0..nr)
        .map(|i| (le64_at(node, 32 + 8 * i), le64_at(node, VALUES + 8 * i)))
        .collect()
}

fn node_u64(img: &Path, b: u64, off: usize) -> u64 {
    let bytes = std::fs::read(img).unwrap();
    le64_at(&bytes, b as usize * BLOCK as usize + off)
}

#[test]
fn a_pointer_into_another_devices_tree_takes_nothing_from_it() {
    // Two devices with 2-level mapping trees (600 and 400 mappings). Device
    // 1's root is made to point at device 2's root, then at device 2's
    // second leaf (re-sealed, so only the structure tells). Salvage reads
    // each tree on its own: device 2 keeps every mapping.
    let t = tempfile::tempdir().unwrap();
    let dev = |id: u64, n: u64, first: u64| -> String {
        let maps: String = (0..n)
            .map(|i| {
                format!(
                    "    <single_mapping origin_block=\"{}\" data_block=\"{}\" time=\"0\"/>\n",
                    2 * i,
                    first + i
                )
            })
            .collect();
        format!("  <device dev_id=\"{id}\" mapped_blocks=\"{n}\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n{maps}  </device>\n")
    };
    let xml = format!(
        "<superblock uuid=\"\" time=\"0\" transaction=\"1\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"2048\">\n{}{}</superblock>\n",
        dev(1, 600, 0),
        dev(2, 400, 1000)
    );
    let x = t.path().join("pool.xml");
    std::fs::write(&x, xml).unwrap();
    let img = blank(t.path(), "meta.img");
    let r = run(
        "thin_restore",
        &["-i", x.to_str().unwrap(), "-o", img.to_str().unwrap()],
    );
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let want = parse(&dump(&img, &[]));
    let roots = device_roots(&img);
    let (r1, r2) = (roots[&1], roots[&2]);
    let leaf2 = node_u64(&img, r2, VALUES + 8);
    for (slot, target) in [(2usize, r2), (0, leaf2)] {
        let case = t.path().join("case.img");
        std::fs::copy(&img, &case).unwrap();
        patch_node(&case, r1, |b| {
            b[VALUES + 8 * slot..VALUES + 8 * slot + 8].copy_from_slice(&target.to_le_bytes())
        });
        assert!(!run("thin_check", &[case.to_str().unwrap()])
            .status
            .success());
        let (got, _) = repair(&case, t.path(), &[]);
        assert_eq!(
            got.maps[&2], want.maps[&2],
            "device 2 (device 1 -> {target})"
        );
        let orig1: std::collections::BTreeSet<_> = want.maps[&1].iter().collect();
        assert!(
            got.maps[&1].iter().all(|m| orig1.contains(m)),
            "device 1 gets nothing of device 2's"
        );
    }
}

#[test]
fn times_after_the_pool_time_are_damage_that_repair_lowers() {
    // Pool time 1. A mapping stamped 5000 and a snap_time of 9999 (re-sealed)
    // fail the check; the repaired pool passes it: the mapping gets time 0
    // (treated as shared: copied on write) and the snap_time the pool time.
    let t = tempfile::tempdir().unwrap();
    let img = origin_and_snapshot(t.path());
    let want = parse(&dump(&img, &[]));
    let roots = device_roots(&img);
    let leaf = {
        let r = roots[&1];
        let bytes = std::fs::read(&img).unwrap();
        // A 101-mapping tree is a single leaf.
        assert_eq!(
            bytes[r as usize * BLOCK as usize + 4],
            2,
            "device 1's root is a leaf"
        );
        r
    };
    patch_node(&img, leaf, |b| {
        let v = le64_at(b, VALUES) & !0xff_ffff | 5000;
        b[VALUES..VALUES + 8].copy_from_slice(&v.to_le_bytes());
    });
    let details = sb_u64(&img, 328);
    patch_node(&img, details, |b| {
        // Entry 1 (device 2): mapped_blocks, transaction, creation, snap_time.
        let off = 32 + 8 * 126 + 24 + 20;
        b[off..off + 4].copy_from_slice(&9999u32.to_le_bytes());
    });
    let ck = run("thin_check", &[img.to_str().unwrap()]);
    assert!(!ck.status.success());
    let (got, _) = repair(&img, t.path(), &[]);
    assert_eq!(got.devs[&2]["snap_time"], "1");
    let first = want.maps[&1][0];
    assert_eq!(first.2, 0, "fixture: device 1's first mapping has time 0");
    assert!(got.maps[&1].contains(&(first.0, first.1, 0)));
    assert_eq!(got.maps[&1].len(), want.maps[&1].len());
}

#[test]
fn a_leaf_with_a_foreign_max_entries_is_not_salvaged() {
    // kernel-small: device 2's leaf says max_entries 249 (re-sealed): its
    // values would be read 24 bytes early, as mappings nobody wrote.
    let t = tempfile::tempdir().unwrap();
    let img = unpack(&fixture_dir().join("meta.img.gz"), t.path(), "meta.img");
    let want = parse(&dump(&img, &[]));
    let leaf = device_roots(&img)[&2];
    patch_node(&img, leaf, |b| {
        b[20..24].copy_from_slice(&249u32.to_le_bytes())
    });
    let got = parse(&dump(&img, &["--repair"]));
    for (dev, maps) in &got.maps {
        for m in maps {
            assert!(
                want.maps[dev].contains(m),
                "device {dev}: {m:?} is not in the original"
            );
        }
    }
}
