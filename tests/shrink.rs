//! thin_shrink through the real binary: XML and binary (--binary) pools made
//! here (written XML, thin_generate_metadata, the kernel-written
//! kernel-small), with data files whose blocks say where they came from.
//! After a shrink every device must read the same bytes, every mapping lie
//! below the new size, sharing be kept, and thin_check pass; the old
//! metadata must still read its old bytes (the copies only went to blocks it
//! does not use); a shrink that cannot fit writes nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use sha2::{Digest, Sha256};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn ok(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what}: exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn attr(line: &str, name: &str) -> u64 {
    let key = format!(" {name}=\"");
    let i = line
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        + key.len();
    line[i..].split('"').next().unwrap().parse().unwrap()
}

fn attr_str<'a>(line: &'a str, name: &str) -> &'a str {
    let key = format!(" {name}=\"");
    let i = line.find(&key).unwrap() + key.len();
    line[i..].split('"').next().unwrap()
}

/// A parsed dump: the superblock's numbers and, per device, virtual block
/// -> data block (`<ref>`s resolved).
#[derive(Debug)]
struct Pool {
    data_block_size: u64,
    nr_data_blocks: u64,
    devices: BTreeMap<u64, BTreeMap<u64, u64>>,
}

impl Pool {
    fn parse(xml: &str) -> Pool {
        let first = xml.lines().next().unwrap();
        let mut defs: HashMap<String, Vec<(u64, u64, u64)>> = HashMap::new();
        let mut devices = BTreeMap::new();
        let mut runs: Vec<(u64, u64, u64)> = Vec::new();
        let (mut def, mut dev) = (String::new(), 0u64);
        for line in xml.lines().map(str::trim) {
            if line.starts_with("<def ") {
                def = attr_str(line, "name").to_string();
                runs.clear();
            } else if line.starts_with("<device ") {
                dev = attr(line, "dev_id");
                runs.clear();
            } else if line.starts_with("<single_mapping") {
                runs.push((attr(line, "origin_block"), attr(line, "data_block"), 1));
            } else if line.starts_with("<range_mapping") {
                runs.push((
                    attr(line, "origin_begin"),
                    attr(line, "data_begin"),
                    attr(line, "length"),
                ));
            } else if line.starts_with("<ref ") {
                runs.extend(defs[attr_str(line, "name")].iter().copied());
            } else if line.starts_with("</def>") {
                defs.insert(def.clone(), runs.clone());
            } else if line.starts_with("</device>") {
                let mut m = BTreeMap::new();
                for &(o, d, n) in &runs {
                    for i in 0..n {
                        assert!(m.insert(o + i, d + i).is_none(), "device {dev}: {o}");
                    }
                }
                devices.insert(dev, m);
            }
        }
        Pool {
            data_block_size: attr(first, "data_block_size"),
            nr_data_blocks: attr(first, "nr_data_blocks"),
            devices,
        }
    }

    fn block_bytes(&self) -> u64 {
        self.data_block_size * 512
    }

    fn used(&self) -> BTreeSet<u64> {
        self.devices
            .values()
            .flat_map(|m| m.values().copied())
            .collect()
    }

    /// True when every device of this pool reads, from `data`, what its
    /// counterpart in `before` read: block by block, the bytes
    /// `expected(old data block)`.
    fn reads_as(&self, before: &Pool, data: &Path, expected: &dyn Fn(u64) -> Vec<u8>) -> bool {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(data).unwrap();
        let bb = self.block_bytes();
        let mut buf = vec![0u8; bb as usize];
        let mut seen = BTreeSet::new();
        for (id, m) in &self.devices {
            for (v, &new) in m {
                let old = before.devices[id][v];
                if seen.insert((new, old)) {
                    f.read_exact_at(&mut buf, new * bb).unwrap();
                    if buf != expected(old) {
                        return false;
                    }
                }
            }
        }
        true
    }
}

fn dump(meta: &Path) -> String {
    String::from_utf8(ok(run("thin_dump", &[s(meta)]), "thin_dump").stdout).unwrap()
}

fn stamp(b: u64) -> Vec<u8> {
    format!("block {b:>12} ").repeat(4).into_bytes()
}

/// What block `b` of [`stamped_data`] holds.
fn stamped_block(b: u64, block_bytes: u64) -> Vec<u8> {
    let st = stamp(b);
    let mut v = vec![0u8; block_bytes as usize];
    v[..st.len()].copy_from_slice(&st);
    let end = v.len() - st.len();
    v[end..].copy_from_slice(&st);
    v
}

/// A sparse data file for `pool` whose used blocks each carry their block
/// number at both ends (a wrong, partial or missing copy shows).
fn stamped_data(dir: &Path, pool: &Pool) -> PathBuf {
    use std::os::unix::fs::FileExt;
    let p = dir.join("data.bin");
    let f = std::fs::File::create(&p).unwrap();
    let bb = pool.block_bytes();
    f.set_len(pool.nr_data_blocks * bb).unwrap();
    for b in pool.used() {
        let st = stamp(b);
        f.write_all_at(&st, b * bb).unwrap();
        f.write_all_at(&st, (b + 1) * bb - st.len() as u64).unwrap();
    }
    p
}

fn shrink(args: &[&str]) -> Output {
    run("thin_shrink", args)
}

/// What a correct shrink of `before` to `after` must satisfy (data file
/// `data`, whose block `b` held `expected(b)` before the shrink).
fn assert_shrunk(
    before: &Pool,
    after: &Pool,
    data: &Path,
    n: u64,
    expected: &dyn Fn(u64) -> Vec<u8>,
) {
    assert_eq!(after.nr_data_blocks, n);
    assert_eq!(after.data_block_size, before.data_block_size);
    let used = after.used();
    assert!(used.iter().all(|&b| b < n), "a mapping at or above {n}");
    // Sharing kept: as many distinct data blocks as before.
    assert_eq!(used.len(), before.used().len());
    assert_eq!(
        before.devices.keys().collect::<Vec<_>>(),
        after.devices.keys().collect::<Vec<_>>()
    );
    // The same virtual blocks, and the same bytes in them.
    for (id, m) in &before.devices {
        let a = &after.devices[id];
        assert_eq!(m.keys().collect::<Vec<_>>(), a.keys().collect::<Vec<_>>());
    }
    assert!(after.reads_as(before, data, expected), "moved data differs");
    // The old metadata still reads its old bytes: the copies went only to
    // blocks it does not use (a crash before the new metadata is safe).
    assert!(
        before.reads_as(before, data, expected),
        "old blocks changed"
    );
}

const XML: &str = r#"<superblock uuid="" time="3" transaction="7" version="2" data_block_size="128" nr_data_blocks="200">
  <def name="shared">
    <range_mapping origin_begin="0" data_begin="150" length="4" time="0"/>
    <single_mapping origin_block="4" data_block="2" time="0"/>
  </def>
  <device dev_id="1" mapped_blocks="12" transaction="1" creation_time="0" snap_time="2">
    <ref name="shared"/>
    <range_mapping origin_begin="10" data_begin="0" length="2" time="1"/>
    <range_mapping origin_begin="12" data_begin="190" length="6" time="1"/>
  </device>
  <device dev_id="2" mapped_blocks="9" transaction="2" creation_time="2" snap_time="2">
    <ref name="shared"/>
    <range_mapping origin_begin="10" data_begin="0" length="2" time="1"/>
    <range_mapping origin_begin="12" data_begin="190" length="1" time="1"/>
    <single_mapping origin_block="13" data_block="199" time="2"/>
  </device>
  <device dev_id="3" mapped_blocks="0" transaction="3" creation_time="3" snap_time="3">
  </device>
</superblock>"#;

#[test]
fn xml_shrink_moves_blocks_down_and_keeps_every_device_and_sharing() {
    let t = tempfile::tempdir().unwrap();
    let before_xml = t.path().join("before.xml");
    std::fs::write(&before_xml, XML).unwrap();
    let before = Pool::parse(XML);
    let data = stamped_data(t.path(), &before);
    let bb = before.block_bytes();

    // 12 blocks in use (0, 1, 2, 150-153, 190-195, 199 = 14): the smallest size is 14.
    assert_eq!(before.used().len(), 14);
    for n in [100u64, 14] {
        let after_xml = t.path().join(format!("after{n}.xml"));
        let nr = n.to_string();
        let out = ok(
            shrink(&[
                "-i",
                s(&before_xml),
                "-o",
                s(&after_xml),
                "--data",
                s(&data),
                "--nr-blocks",
                &nr,
            ]),
            "thin_shrink",
        );
        assert!(out.stderr.is_empty());
        let text = std::fs::read_to_string(&after_xml).unwrap();
        // The superblock and devices are kept, only the size changes.
        assert!(text.starts_with(&format!("<superblock uuid=\"\" time=\"3\" transaction=\"7\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"{n}\">")));
        assert!(text.contains("<device dev_id=\"2\" mapped_blocks=\"9\" transaction=\"2\" creation_time=\"2\" snap_time=\"2\">"));
        assert_eq!(text.matches("<ref name=\"shared\"/>").count(), 2);
        let after = Pool::parse(&text);
        assert_shrunk(&before, &after, &data, n, &|b| stamped_block(b, bb));
        // Block 190 is shared by devices 1 and 2: both now point at one new block.
        assert_eq!(after.devices[&1][&12], after.devices[&2][&12]);
        // The result restores and checks.
        let meta = t.path().join("meta");
        std::fs::File::create(&meta)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        ok(
            run("thin_restore", &["-i", s(&after_xml), "-o", s(&meta)]),
            "thin_restore",
        );
        // (A hand-written <def> is a leaf of its own, smaller than the
        // kernel would leave it: a non-fatal finding, before and after.)
        ok(
            run("thin_check", &["--ignore-non-fatal-errors", s(&meta)]),
            "thin_check",
        );
    }
}

#[test]
fn a_shrink_that_cannot_fit_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    let before_xml = t.path().join("before.xml");
    std::fs::write(&before_xml, XML).unwrap();
    let before = Pool::parse(XML);
    let data = stamped_data(t.path(), &before);
    let data_bytes = std::fs::read(&data).unwrap();
    let after_xml = t.path().join("after.xml");
    let out = shrink(&[
        "-i",
        s(&before_xml),
        "-o",
        s(&after_xml),
        "--data",
        s(&data),
        "--nr-blocks",
        "13",
    ]);
    assert_one_line_error(&out, "too small");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Insufficient free space"), "{err}");
    assert!(err.contains("cannot be smaller than 14 blocks"), "{err}");
    assert!(!after_xml.exists());
    assert!(std::fs::read(&data).unwrap() == data_bytes);

    // Binary: the output device keeps its bytes too.
    let meta = t.path().join("meta");
    std::fs::File::create(&meta)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    ok(
        run("thin_restore", &["-i", s(&before_xml), "-o", s(&meta)]),
        "thin_restore",
    );
    let out_meta = t.path().join("out");
    std::fs::write(&out_meta, vec![0x5au8; 1 << 20]).unwrap();
    let out = shrink(&[
        "-i",
        s(&meta),
        "-o",
        s(&out_meta),
        "--data",
        s(&data),
        "--nr-blocks",
        "13",
        "--binary",
    ]);
    assert_one_line_error(&out, "too small, binary");
    assert_eq!(out.status.code(), Some(64));
    assert!(std::fs::read(&out_meta).unwrap() == vec![0x5au8; 1 << 20]);
    assert!(std::fs::read(&data).unwrap() == data_bytes);

    // Growing is refused; the input as the output is refused.
    let out = shrink(&[
        "-i",
        s(&before_xml),
        "-o",
        s(&after_xml),
        "--data",
        s(&data),
        "--nr-blocks",
        "201",
    ]);
    assert_one_line_error(&out, "grow");
    assert_eq!(out.status.code(), Some(64));
    assert!(!after_xml.exists());
    let out = shrink(&[
        "-i",
        s(&before_xml),
        "-o",
        s(&before_xml),
        "--data",
        s(&data),
        "--nr-blocks",
        "100",
    ]);
    assert_one_line_error(&out, "same file");
    assert_eq!(std::fs::read_to_string(&before_xml).unwrap(), XML);
    // A data device too small for the blocks to move: nothing written.
    let small = t.path().join("small.bin");
    std::fs::File::create(&small)
        .unwrap()
        .set_len(65536 * 100)
        .unwrap();
    let out = shrink(&[
        "-i",
        s(&before_xml),
        "-o",
        s(&after_xml),
        "--data",
        s(&small),
        "--nr-blocks",
        "100",
    ]);
    assert_one_line_error(&out, "small data");
    assert_eq!(out.status.code(), Some(66));
    assert!(!after_xml.exists());
}

#[test]
fn no_copy_rewrites_the_metadata_and_leaves_the_data_alone() {
    let t = tempfile::tempdir().unwrap();
    let before_xml = t.path().join("before.xml");
    std::fs::write(&before_xml, XML).unwrap();
    let before = Pool::parse(XML);
    let data = stamped_data(t.path(), &before);
    let data_bytes = std::fs::read(&data).unwrap();
    let after_xml = t.path().join("after.xml");
    ok(
        shrink(&[
            "-i",
            s(&before_xml),
            "-o",
            s(&after_xml),
            "--data",
            s(&data),
            "--nr-blocks",
            "20",
            "--no-copy",
        ]),
        "--no-copy",
    );
    assert!(std::fs::read(&data).unwrap() == data_bytes);
    let after = Pool::parse(&std::fs::read_to_string(&after_xml).unwrap());
    assert_eq!(after.nr_data_blocks, 20);
    assert!(after.used().iter().all(|&b| b < 20));
    assert_eq!(after.used().len(), 14);
    // Without the copy the moved blocks do not hold their data.
    let bb = before.block_bytes();
    assert!(!after.reads_as(&before, &data, &|b| stamped_block(b, bb)));
}

#[test]
fn binary_shrink_of_a_generated_pool_to_its_smallest_size() {
    let t = tempfile::tempdir().unwrap();
    let meta = t.path().join("meta");
    std::fs::File::create(&meta)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    ok(
        run(
            "thin_generate_metadata",
            &[
                "-q",
                "-o",
                s(&meta),
                "--origins",
                "2",
                "--segments",
                "3",
                "--snaps",
                "2",
                "--writes",
                "1",
                "--seed",
                "7",
            ],
        ),
        "generate",
    );
    // The first snapshots' private blocks become holes below the end.
    for dev in ["3", "4"] {
        ok(run("thin_message", &[s(&meta), "delete", dev]), "delete");
    }
    let xml = t.path().join("before.xml");
    std::fs::write(&xml, dump(&meta)).unwrap();
    let before = Pool::parse(&dump(&meta));
    let data = stamped_data(t.path(), &before);
    let bb = before.block_bytes();
    let n = before.used().len() as u64;
    assert!(
        before.used().iter().any(|&b| b >= n),
        "the pool must have blocks to move"
    );
    let out_meta = t.path().join("out");
    std::fs::File::create(&out_meta)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let meta_bytes = std::fs::read(&meta).unwrap();
    let nr = n.to_string();
    ok(
        shrink(&[
            "-i",
            s(&meta),
            "-o",
            s(&out_meta),
            "--data",
            s(&data),
            "--nr-blocks",
            &nr,
            "--binary",
        ]),
        "thin_shrink --binary",
    );
    assert!(
        std::fs::read(&meta).unwrap() == meta_bytes,
        "input untouched"
    );
    ok(run("thin_check", &[s(&out_meta)]), "thin_check");
    let after_xml = dump(&out_meta);
    let after = Pool::parse(&after_xml);
    assert_shrunk(&before, &after, &data, n, &|b| stamped_block(b, bb));
    // Shared leaves stay shared.
    let before_xml = dump(&meta);
    assert_eq!(
        before_xml.matches("<ref ").count(),
        after_xml.matches("<ref ").count()
    );
    assert!(after_xml.matches("<ref ").count() > 0);
    // The data space map is the new size, every block counted (thin_check
    // above), and ls agrees the pool is full.
    let ls = ok(run("thin_ls", &[s(&out_meta)]), "thin_ls");
    assert!(!ls.stdout.is_empty());

    // The same through XML gives the same mappings.
    let after2 = t.path().join("after.xml");
    // (The data as it is now: the old blocks are untouched, the copy repeats.)
    ok(
        shrink(&[
            "-i",
            s(&xml),
            "-o",
            s(&after2),
            "--data",
            s(&data),
            "--nr-blocks",
            &nr,
        ]),
        "thin_shrink xml",
    );
    assert_eq!(
        Pool::parse(&std::fs::read_to_string(&after2).unwrap()).devices,
        after.devices
    );
}

#[test]
fn binary_shrink_of_the_kernel_pool_keeps_every_device_as_the_kernel_wrote_it() {
    let t = tempfile::tempdir().unwrap();
    let dir = fixture_dir();
    let meta = unpack(&dir.join("meta.img.gz"), t.path(), "meta.img");
    let data = unpack(&dir.join("data.img.gz"), t.path(), "data.img");
    let out_meta = t.path().join("out.img");
    std::fs::File::create(&out_meta)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let data_bytes = std::fs::read(&data).unwrap();
    let meta_bytes = std::fs::read(&meta).unwrap();
    let out_bytes = std::fs::read(&out_meta).unwrap();

    // A held metadata snapshot still maps blocks: refused, nothing written.
    let args = |n: &str| -> Vec<String> {
        [
            "-i",
            s(&meta),
            "-o",
            s(&out_meta),
            "--data",
            s(&data),
            "--nr-blocks",
            n,
            "--binary",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect()
    };
    let argv = args("200");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = shrink(&argv);
    assert_one_line_error(&out, "metadata snapshot held");
    assert!(String::from_utf8_lossy(&out.stderr).contains("release it first"));
    assert!(std::fs::read(&meta).unwrap() == meta_bytes);
    assert!(std::fs::read(&out_meta).unwrap() == out_bytes);
    assert!(std::fs::read(&data).unwrap() == data_bytes);

    // Releasing the snapshot and deleting device 2 (the snapshot of 1) frees
    // the blocks only they used: holes below the blocks written last.
    ok(
        run("thin_message", &[s(&meta), "release_metadata_snap"]),
        "release",
    );
    ok(run("thin_message", &[s(&meta), "delete", "2"]), "delete 2");
    let before = Pool::parse(&dump(&meta));
    let used = before.used();
    let n = used.len() as u64;
    assert!(
        used.iter().any(|&b| b >= n),
        "kernel-small has blocks to move"
    );
    let bb = before.block_bytes() as usize;
    let argv = args(&n.to_string());
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    ok(shrink(&argv), "thin_shrink kernel-small");
    ok(run("thin_check", &[s(&out_meta)]), "thin_check");
    let after_xml = dump(&out_meta);
    let after = Pool::parse(&after_xml);
    assert_shrunk(&before, &after, &data, n, &|b| {
        data_bytes[b as usize * bb..(b as usize + 1) * bb].to_vec()
    });
    assert!(after_xml.starts_with(&format!("<superblock uuid=\"\" time=\"2\" transaction=\"5\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"{n}\">")));

    // Each device rebuilt from the new metadata and the data is what the
    // kernel read from it (tests/data/kernel-small/expect, `final`).
    let data = std::fs::read(&data).unwrap();
    let expect = std::fs::read_to_string(dir.join("expect")).unwrap();
    let mut checked = 0;
    for line in expect
        .lines()
        .filter(|l| l.starts_with("final.thin") && !l.starts_with("final.thin2 "))
    {
        let f: Vec<&str> = line.split_whitespace().collect();
        let id: u64 = f[0].trim_start_matches("final.thin").parse().unwrap();
        let sectors: usize = f[1].parse().unwrap();
        let mut dev = vec![0u8; sectors * 512];
        for (&v, &d) in &after.devices[&id] {
            let dst = v as usize * bb;
            if dst >= dev.len() {
                continue;
            }
            let n = bb.min(dev.len() - dst);
            dev[dst..dst + n].copy_from_slice(&data[d as usize * bb..d as usize * bb + n]);
        }
        assert_eq!(format!("{:x}", Sha256::digest(&dev)), f[2], "{}", f[0]);
        checked += 1;
    }
    assert_eq!(checked, 3);
}

/// A pool that claims 10^14 data blocks: planning costs its mappings, not
/// its claimed size (this aborted allocating a 12 TB bitmap). Without the
/// copy the metadata is rewritten; with it the small data device is refused
/// before anything is written.
#[test]
fn a_huge_nr_data_blocks_is_planned_without_allocating_the_pool() {
    let t = tempfile::tempdir().unwrap();
    let xml = t.path().join("huge.xml");
    std::fs::write(
        &xml,
        r#"<superblock uuid="" time="1" transaction="1" version="2" data_block_size="128" nr_data_blocks="100000000000000">
  <device dev_id="1" mapped_blocks="5" transaction="0" creation_time="0" snap_time="0">
    <range_mapping origin_begin="0" data_begin="0" length="2" time="0"/>
    <range_mapping origin_begin="2" data_begin="1000000000000" length="3" time="0"/>
  </device>
</superblock>"#,
    )
    .unwrap();
    let data = t.path().join("data.bin");
    std::fs::write(&data, vec![7u8; 1 << 20]).unwrap();
    let out_xml = t.path().join("out.xml");
    ok(
        shrink(&[
            "-i",
            s(&xml),
            "-o",
            s(&out_xml),
            "--data",
            s(&data),
            "--nr-blocks",
            "10",
            "--no-copy",
        ]),
        "--no-copy on a huge pool",
    );
    let text = std::fs::read_to_string(&out_xml).unwrap();
    assert!(text.contains("nr_data_blocks=\"10\""), "{text}");
    assert!(
        text.contains(
            "<range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"5\" time=\"0\"/>"
        ),
        "{text}"
    );

    let out_xml2 = t.path().join("out2.xml");
    let out = shrink(&[
        "-i",
        s(&xml),
        "-o",
        s(&out_xml2),
        "--data",
        s(&data),
        "--nr-blocks",
        "10",
    ]);
    assert_eq!(out.status.code(), Some(66), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("data block 1000000000002"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(!out_xml2.exists());
    assert_eq!(std::fs::read(&data).unwrap(), vec![7u8; 1 << 20]);
}
