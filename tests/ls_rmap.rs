//! thin_ls, thin_rmap and thin_metadata_size through the real binary.
//!
//! On the kernel-written fixture (devices 1-4; 3 and 4 share their only
//! leaf; a metadata snapshot is held) every expected value is computed here
//! from thin_dump's XML, independently of the tools' own code:
//!
//! * thin_ls: a mapping inside a `<def>` (a leaf several devices reach) is
//!   shared; a device's own mapping is shared when its data block appears in
//!   another of the dump's leaves (another device's own mappings or a def),
//!   exclusive otherwise;
//! * thin_rmap: devices in id order, each `<def>` listed only for the first
//!   device that refers to it, runs merged while device, virtual and data
//!   blocks all continue, then sorted.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use common::*;
use thinmeta::pdata::checksum::{self, BlockKind};

/// A device of a dump: its details and its entries in key order.
#[derive(Debug, Default, Clone)]
struct Dev {
    id: u64,
    transaction: u64,
    creation_time: u64,
    snap_time: u64,
    entries: Vec<Entry>,
}

#[derive(Debug, Clone)]
enum Entry {
    /// (virtual block, data block)
    Map(u64, u64),
    Ref(String),
}

#[derive(Debug, Default)]
struct Dump {
    data_block_size: u64,
    defs: BTreeMap<String, Vec<(u64, u64)>>,
    devs: Vec<Dev>,
}

fn attr(line: &str, name: &str) -> Option<String> {
    let key = format!(" {name}=\"");
    let start = line.find(&key)? + key.len();
    let end = start + line[start..].find('"')?;
    Some(line[start..end].to_string())
}

fn num(line: &str, name: &str) -> u64 {
    attr(line, name)
        .unwrap_or_else(|| panic!("no {name} in {line}"))
        .parse()
        .unwrap()
}

/// Parse the peer-format XML, expanding ranges to single blocks.
fn parse_dump(xml: &str) -> Dump {
    let mut d = Dump::default();
    let mut in_def: Option<String> = None;
    let mut dev: Option<Dev> = None;
    for line in xml.lines() {
        let t = line.trim();
        let maps: Vec<(u64, u64)> = if t.starts_with("<single_mapping") {
            vec![(num(t, "origin_block"), num(t, "data_block"))]
        } else if t.starts_with("<range_mapping") {
            let (o, b, n) = (
                num(t, "origin_begin"),
                num(t, "data_begin"),
                num(t, "length"),
            );
            (0..n).map(|i| (o + i, b + i)).collect()
        } else {
            Vec::new()
        };
        if t.starts_with("<superblock") {
            d.data_block_size = num(t, "data_block_size");
        } else if t.starts_with("<def ") {
            in_def = attr(t, "name");
        } else if t.starts_with("</def>") {
            in_def = None;
        } else if t.starts_with("<device ") {
            dev = Some(Dev {
                id: num(t, "dev_id"),
                transaction: num(t, "transaction"),
                creation_time: num(t, "creation_time"),
                snap_time: num(t, "snap_time"),
                entries: Vec::new(),
            });
        } else if t.starts_with("</device>") {
            d.devs.push(dev.take().unwrap());
        } else if t.starts_with("<ref ") {
            let name = attr(t, "name").unwrap();
            dev.as_mut().unwrap().entries.push(Entry::Ref(name));
        } else if !maps.is_empty() {
            if let Some(name) = &in_def {
                d.defs.entry(name.clone()).or_default().extend(maps);
            } else {
                let e = &mut dev.as_mut().unwrap().entries;
                e.extend(maps.into_iter().map(|(v, b)| Entry::Map(v, b)));
            }
        }
    }
    d
}

fn fixture() -> PathBuf {
    fixture_dir().join("meta.img.gz")
}

fn dump_of(args: &[&str]) -> Dump {
    let out = run("thin_dump", args);
    assert!(out.status.success(), "{:?}", out);
    parse_dump(&String::from_utf8(out.stdout).unwrap())
}

/// (dev, mapped, exclusive, shared, highest, transaction, creation, snap) per device.
fn expected_ls(d: &Dump) -> Vec<[u64; 8]> {
    // Data references by distinct leaf content: each def once, each
    // device's own mappings once.
    let mut refs: HashMap<u64, u64> = HashMap::new();
    for maps in d.defs.values() {
        for &(_, b) in maps {
            *refs.entry(b).or_default() += 1;
        }
    }
    for dev in &d.devs {
        for e in &dev.entries {
            if let Entry::Map(_, b) = e {
                *refs.entry(*b).or_default() += 1;
            }
        }
    }
    d.devs
        .iter()
        .map(|dev| {
            let (mut mapped, mut shared, mut highest) = (0, 0, 0);
            for e in &dev.entries {
                match e {
                    Entry::Map(v, b) => {
                        mapped += 1;
                        if refs[b] > 1 {
                            shared += 1;
                        }
                        highest = highest.max(*v);
                    }
                    Entry::Ref(n) => {
                        let maps = &d.defs[n];
                        mapped += maps.len() as u64;
                        shared += maps.len() as u64;
                        highest = maps.iter().map(|m| m.0).fold(highest, u64::max);
                    }
                }
            }
            [
                dev.id,
                mapped,
                mapped - shared,
                shared,
                highest,
                dev.transaction,
                dev.creation_time,
                dev.snap_time,
            ]
        })
        .collect()
}

const ALL8: &str =
    "DEV,MAPPED_BLOCKS,EXCLUSIVE_BLOCKS,SHARED_BLOCKS,HIGHEST_BLOCK,TRANSACTION,CREATE_TIME,SNAP_TIME";

fn ls_rows(args: &[&str]) -> (String, Vec<Vec<u64>>) {
    let out = run("thin_ls", args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let rows = text
        .lines()
        .filter(|l| !l.bytes().any(|c| c.is_ascii_uppercase()))
        .map(|l| {
            l.split_whitespace()
                .map(|c| c.parse::<u64>().unwrap())
                .collect()
        })
        .collect();
    (text, rows)
}

/// The peer's table layout: right-aligned to the widest cell, a space after each.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut all: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    all.extend(rows.iter().cloned());
    let widths: Vec<usize> = (0..header.len())
        .map(|c| all.iter().map(|r| r[c].len()).max().unwrap())
        .collect();
    let mut s = String::new();
    for r in &all {
        for (c, w) in r.iter().zip(&widths) {
            s.push_str(&format!("{c:>w$} "));
        }
        s.push('\n');
    }
    s
}

#[test]
fn thin_ls_counts_match_the_dump() {
    let f = fixture();
    let f = f.to_str().unwrap();
    let d = dump_of(&[f]);
    let want = expected_ls(&d);
    assert_eq!(want.len(), 4);
    // The fixture's shape: 3 and 4 share everything, 1 and 2 some blocks.
    assert_eq!(want[2][2], 0);
    assert_eq!(want[3][2], 0);
    assert!(want[0][3] > 0 && want[0][2] > 0);

    let (text, rows) = ls_rows(&["--format", ALL8, f]);
    let got: Vec<[u64; 8]> = rows.iter().map(|r| r[..].try_into().unwrap()).collect();
    assert_eq!(got, want);
    let header: Vec<&str> = ALL8.split(',').collect();
    let cells: Vec<Vec<String>> = want
        .iter()
        .map(|r| r.iter().map(|v| v.to_string()).collect())
        .collect();
    assert_eq!(text, table(&header, &cells));
}

#[test]
fn thin_ls_m_lists_the_metadata_snapshot() {
    let f = fixture();
    let f = f.to_str().unwrap();
    let d = dump_of(&["-m", f]);
    let want = expected_ls(&d);
    let (_, rows) = ls_rows(&["-m", "-o", ALL8, f]);
    let got: Vec<[u64; 8]> = rows.iter().map(|r| r[..].try_into().unwrap()).collect();
    assert_eq!(got, want);
    // The live view differs (dev 1 was written after the snapshot).
    assert_ne!(want, expected_ls(&dump_of(&[f])));
}

#[test]
fn thin_ls_units_default_format_and_no_headers() {
    let f = fixture();
    let f = f.to_str().unwrap();
    let d = dump_of(&[f]);
    let bs = d.data_block_size;
    let want = expected_ls(&d);

    // Sectors and bytes, computed from blocks here.
    let (text, rows) = ls_rows(&[
        "--no-headers",
        "-o",
        "DEV,MAPPED_SECTORS,EXCLUSIVE_SECTORS,SHARED_SECTORS,HIGHEST_SECTOR,MAPPED_BYTES,EXCLUSIVE_BYTES,SHARED_BYTES,HIGHEST_BYTE",
        f,
    ]);
    assert!(!text.contains("DEV"));
    assert_eq!(text.lines().count(), want.len());
    for (r, w) in rows.iter().zip(&want) {
        assert_eq!(
            r,
            &vec![
                w[0],
                w[1] * bs,
                w[2] * bs,
                w[3] * bs,
                (w[4] + 1) * bs - 1,
                w[1] * bs * 512,
                w[2] * bs * 512,
                w[3] * bs * 512,
                (w[4] + 1) * bs * 512 - 1,
            ]
        );
    }

    // Default columns: DEV, MAPPED (human size), CREATE_TIME, SNAP_TIME.
    let out = run("thin_ls", &[f]);
    assert!(out.status.success());
    let human = |bytes: u64| -> String {
        // All fixture sizes are small multiples of 64 KiB.
        assert!(bytes % 1024 == 0 && bytes / 1024 <= 8192);
        if bytes <= 8192 {
            format!("{bytes}b")
        } else {
            format!("{}KiB", bytes / 1024)
        }
    };
    let cells: Vec<Vec<String>> = want
        .iter()
        .map(|w| {
            vec![
                w[0].to_string(),
                human(w[1] * bs * 512),
                w[6].to_string(),
                w[7].to_string(),
            ]
        })
        .collect();
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        table(&["DEV", "MAPPED", "CREATE_TIME", "SNAP_TIME"], &cells)
    );

    // Fields that need no mappings: details only.
    let (text, _) = ls_rows(&["-o", "TRANSACTION,DEV", f]);
    let cells: Vec<Vec<String>> = want
        .iter()
        .map(|w| vec![w[5].to_string(), w[0].to_string()])
        .collect();
    assert_eq!(text, table(&["TRANSACTION", "DEV"], &cells));
}

/// thin_rmap's expected lines for `regions`, from the dump.
fn expected_rmap(d: &Dump, regions: &[(u64, u64)]) -> Vec<String> {
    let inside = |b: u64| regions.iter().any(|&(s, e)| s <= b && b < e);
    let mut seen_defs = std::collections::HashSet::new();
    // (data begin, data end, dev, thin begin)
    let mut runs: Vec<(u64, u64, u64, u64)> = Vec::new();
    let mut cur: Option<(u64, u64, u64, u64)> = None;
    for dev in &d.devs {
        let mut maps: Vec<(u64, u64)> = Vec::new();
        for e in &dev.entries {
            match e {
                Entry::Map(v, b) => maps.push((*v, *b)),
                Entry::Ref(n) => {
                    if seen_defs.insert(n.clone()) {
                        maps.extend(&d.defs[n]);
                    }
                }
            }
        }
        for (v, b) in maps.into_iter().filter(|m| inside(m.1)) {
            match &mut cur {
                Some(c) if c.2 == dev.id && c.1 == b && c.3 + (c.1 - c.0) == v => c.1 += 1,
                _ => {
                    if let Some(c) = cur.replace((b, b + 1, dev.id, v)) {
                        runs.push(c);
                    }
                }
            }
        }
    }
    runs.extend(cur);
    runs.sort();
    runs.iter()
        .map(|&(b, e, dev, v)| format!("data {b}..{e} -> thin({dev}) {v}..{}", v + (e - b)))
        .collect()
}

fn rmap_lines(f: &str, regions: &[&str]) -> Vec<String> {
    let mut args: Vec<&str> = Vec::new();
    for r in regions {
        args.push("--region");
        args.push(r);
    }
    args.push(f);
    let out = run("thin_rmap", &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn thin_rmap_matches_the_dump() {
    let f = fixture();
    let f = f.to_str().unwrap();
    let d = dump_of(&[f]);
    let cases: &[&[(u64, u64)]] = &[
        &[(0, 256)],
        &[(0, 3)],
        &[(20, 30), (0, 3)],
        &[(24, 25)],
        &[(10, 12), (11, 40)],
        &[(200, 256)],
    ];
    for regions in cases {
        let strs: Vec<String> = regions.iter().map(|(b, e)| format!("{b}..{e}")).collect();
        let strs: Vec<&str> = strs.iter().map(String::as_str).collect();
        let want = expected_rmap(&d, regions);
        assert_eq!(rmap_lines(f, &strs), want, "{regions:?}");
    }
    // The full map covers every own mapping of each device and each def once.
    let full = expected_rmap(&d, &[(0, 256)]);
    let total: u64 = full
        .iter()
        .map(|l| {
            let r = l.split_whitespace().nth(1).unwrap();
            let (b, e) = r.split_once("..").unwrap();
            e.parse::<u64>().unwrap() - b.parse::<u64>().unwrap()
        })
        .sum();
    let own: usize = d
        .devs
        .iter()
        .flat_map(|x| &x.entries)
        .filter(|e| matches!(e, Entry::Map(..)))
        .count();
    let defs: usize = d.defs.values().map(Vec::len).sum();
    assert_eq!(total as usize, own + defs);
    // Device 4 shares its only leaf with device 3: it is never listed.
    assert!(full.iter().all(|l| !l.contains("thin(4)")));
    assert!(empty_region_is_empty(f));
}

fn empty_region_is_empty(f: &str) -> bool {
    rmap_lines(f, &["250..256"]).is_empty()
}

fn assert_usage_error(tool: &str, args: &[&str], what: &str) {
    let out = run(tool, args);
    assert_one_line_error(&out, what);
    assert_eq!(out.status.code(), Some(64), "{what}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{what}: {err}");
    assert!(out.stdout.is_empty(), "{what}");
}

#[test]
fn bad_arguments_are_one_line_usage_errors() {
    let f = fixture();
    let f = f.to_str().unwrap();
    assert_usage_error("thin_ls", &["-o", "DEV,NOPE", f], "unknown field");
    assert_usage_error("thin_ls", &["-o", "dev", f], "lower-case field");
    assert_usage_error("thin_ls", &["-o", "", f], "empty field list");
    for r in ["5..5", "7..3", "x", "1..", "..2", "1..2,3", "-1..4"] {
        assert_usage_error("thin_rmap", &["--region", r, f], r);
    }
    assert_usage_error(
        "thin_rmap",
        &["--region", "0..4", "--region", "9..2", f],
        "second region reversed",
    );
    let ms = |a: &[&str], what: &str| assert_usage_error("thin_metadata_size", a, what);
    ms(
        &["-b", "32k", "-s", "1g", "-m", "1"],
        "block size not 64 KiB",
    );
    ms(
        &["-b", "2g", "-s", "1t", "-m", "1"],
        "block size above 1 GiB",
    );
    ms(&["-b", "64k", "-s", "32k", "-m", "1"], "pool below a block");
    ms(&["-b", "64k", "-s", "1z", "-m", "1"], "unknown size unit");
    ms(&["-b", "64k", "-s", "1g", "-m", "x"], "bad max thins");
    ms(&["-b", "64k", "-s", "1g", "-m", "1", "-u", "q"], "bad unit");
    ms(&["-b", "64k", "-s", "1g", "-m", "1", "-n=mid"], "bad -n");
    ms(&["-b", "64k", "-s", "16e", "-m", "1"], "size overflow");
}

#[test]
fn missing_or_broken_input_never_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing");
    let missing = missing.to_str().unwrap();
    for (tool, args) in [
        ("thin_ls", vec![missing]),
        ("thin_rmap", vec!["--region", "0..1", missing]),
        ("thin_ls", vec![]),
        ("thin_rmap", vec![missing]),
        ("thin_metadata_size", vec![]),
    ] {
        let out = run(tool, &args);
        let code = out.status.code().unwrap();
        assert!(code != 0 && code != 2, "{tool} {args:?}: {code}");
    }
    // No metadata snapshot held: thin_ls -m fails.
    let zeros = dir.path().join("zeros");
    std::fs::write(&zeros, vec![0u8; 1 << 20]).unwrap();
    let out = run("thin_ls", &["-m", zeros.to_str().unwrap()]);
    assert_one_line_error(&out, "thin_ls -m on zeros");
}

#[test]
fn thin_ls_m_needs_a_held_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let img = unpack(&fixture(), dir.path(), "meta.img");
    // Clear metadata_snap (superblock offset 56) and reseal.
    let mut data = std::fs::read(&img).unwrap();
    assert_ne!(data[56..64], [0u8; 8]);
    data[56..64].copy_from_slice(&0u64.to_le_bytes());
    checksum::seal(&mut data[..4096], BlockKind::ThinSuperblock);
    std::fs::write(&img, &data).unwrap();
    let out = run("thin_ls", &["-m", img.to_str().unwrap()]);
    assert_one_line_error(&out, "no metadata snapshot");
    let out = run("thin_ls", &[img.to_str().unwrap()]);
    assert!(out.status.success());
}

//------------------------------------------------------------------------------
// thin_metadata_size

const MAX_METADATA_BLOCKS: u64 = 255 * 16320;

/// The peer's estimate, bytes: superblock + half-full leaves (126 mappings)
/// + one root per thin, capped, times 4096.
fn estimate(block: u64, pool: u64, thins: u64) -> u64 {
    let nr = pool / block;
    let leaves = nr / 126 + u64::from(nr % 126 != 0);
    (1 + leaves + thins).min(MAX_METADATA_BLOCKS) * 4096
}

fn size_out(args: &[&str]) -> String {
    let out = run("thin_metadata_size", args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn thin_metadata_size_numeric_for_stratis() {
    // Stratis: -b <N>b -s <N>b -m <thins> -n, one integer of sectors.
    for (block, pool, thins) in [
        (65536u64, 1u64 << 30, 100u64),
        (65536, 1 << 40, 1000),
        (1 << 20, 3 << 40, 10),
        (65536 * 3, 5_000_000_000_000, 0),
        (1 << 30, 1 << 30, 1),
        (65536, u64::MAX / 512 * 512, 5),
    ] {
        let b = format!("{block}b");
        let p = format!("{pool}b");
        let m = thins.to_string();
        let bytes = estimate(block, pool, thins);
        assert_eq!(bytes % 512, 0);
        let want = format!("{}\n", bytes / 512);
        assert_eq!(
            size_out(&["-b", &b, "-s", &p, "-m", &m, "-n"]),
            want,
            "{block} {pool} {thins}"
        );
    }
    // By hand: 1 GiB of 64 KiB blocks, 100 thins: 16384 blocks need 131
    // leaves; 1 + 131 + 100 = 232 blocks of 8 sectors.
    assert_eq!(
        size_out(&["-b", "65536b", "-s", "1073741824b", "-m", "100", "-n"]),
        "1856\n"
    );
}

#[test]
fn thin_metadata_size_units_and_styles() {
    // 1 TiB of 64 KiB blocks, 1000 thins: 2^24 blocks, 133153 leaves,
    // 134154 blocks = 549494784 bytes.
    let bytes = estimate(64 << 10, 1 << 40, 1000);
    assert_eq!(bytes, 134_154 * 4096);
    let base = ["-b", "64k", "-s", "1t", "-m", "1000"];
    let with = |extra: &[&str]| {
        let mut a = base.to_vec();
        a.extend_from_slice(extra);
        size_out(&a)
    };
    assert_eq!(with(&[]), format!("{} sectors\n", bytes / 512));
    assert_eq!(
        with(&["-u", "s", "-n=short"]),
        format!("{}s\n", bytes / 512)
    );
    assert_eq!(with(&["-u", "b", "-n=long"]), format!("{bytes}bytes\n"));
    assert_eq!(with(&["-u", "k", "-n"]), format!("{}\n", bytes / 1024));
    // 524.04 MiB: two decimals when not whole.
    assert_eq!(with(&["-u", "m"]), "524.04 mebibytes\n");
    assert_eq!(with(&["--unit=MiB", "-n=short"]), "524.04m\n");
    // Below 1: the shortest exact decimal.
    assert_eq!(
        with(&["-u", "g", "-n"]),
        format!("{}\n", bytes as f64 / (1u64 << 30) as f64)
    );
    assert_eq!(with(&["-u", "G", "-n"]), "0.549494784\n");
    assert_eq!(
        with(&["-u", "M", "--numeric-only=long"]),
        "549.49megabytes\n"
    );
    assert_eq!(with(&["-u", "K", "-n=short"]), "549494.78K\n");
    // The peer's long name for the tebibyte.
    assert!(with(&["-u", "t"]).ends_with(" terabytes\n"));
    // Size spellings: sectors by default, binary and decimal units.
    let n = |b: &str, s: &str| size_out(&["-b", b, "-s", s, "-m", "7", "-n"]);
    let want = |block: u64, pool: u64| format!("{}\n", estimate(block, pool, 7) / 512);
    assert_eq!(n("128", "2097152"), want(65536, 1 << 30));
    assert_eq!(n("64KiB", "1GiB"), want(65536, 1 << 30));
    assert_eq!(n("1m", "10G"), want(1 << 20, 10_000_000_000));
    assert_eq!(n("64kibibyte", "2TB"), want(65536, 2_000_000_000_000));
    assert_eq!(n("64k", "1p"), want(65536, 1 << 50));
    assert_eq!(n("64k", "1P"), want(65536, 1_000_000_000_000_000));
    // Capped at the largest metadata device (255 bitmaps).
    assert_eq!(n("64k", "15e"), format!("{}\n", MAX_METADATA_BLOCKS * 8));
}

#[test]
fn version_and_help() {
    for tool in ["thin_ls", "thin_rmap", "thin_metadata_size"] {
        let out = run(tool, &["-V"]);
        assert!(out.status.success());
        assert_eq!(
            String::from_utf8(out.stdout).unwrap().trim(),
            env!("CARGO_PKG_VERSION")
        );
        let out = run(tool, &["--help"]);
        assert!(out.status.success(), "{tool}");
    }
}

/// Resealed damage (a writer bug, not bit rot) in any btree node: thin_ls
/// and thin_rmap give a result or an error, never a panic.
#[test]
fn resealed_damage_in_any_node_never_panics() {
    use std::os::unix::fs::FileExt;
    use thinmeta::pdata::io::{BlockDevice, OpenMode};
    use thinmeta::pdata::BLOCK_SIZE;
    use thinmeta::thin::{ls, rmap};

    let dir = tempfile::tempdir().unwrap();
    let path = unpack(&fixture(), dir.path(), "meta.img");
    let file = open_rw(&path);
    let nr_blocks = std::fs::metadata(&path).unwrap().len() / BLOCK_SIZE as u64;
    let (details_root, mapping_root) = {
        let mut sb = vec![0u8; BLOCK_SIZE];
        file.read_exact_at(&mut sb, 0).unwrap();
        (
            u64::from_le_bytes(sb[328..336].try_into().unwrap()),
            u64::from_le_bytes(sb[320..328].try_into().unwrap()),
        )
    };
    let mut nodes = Vec::new();
    for b in 0..nr_blocks {
        let mut blk = vec![0u8; BLOCK_SIZE];
        file.read_exact_at(&mut blk, b * BLOCK_SIZE as u64).unwrap();
        if checksum::identify(&blk) == Some(BlockKind::BTreeNode) {
            nodes.push((b, blk));
        }
    }
    assert!(nodes.len() > 5);
    let mut runs = 0;
    for (b, orig) in &nodes {
        let nr = u32::from_le_bytes(orig[16..20].try_into().unwrap()) as usize;
        let max = u32::from_le_bytes(orig[20..24].try_into().unwrap()) as usize;
        let vsize = u32::from_le_bytes(orig[24..28].try_into().unwrap()) as usize;
        // Header words, the keys and the values in use (and one beyond).
        let mut offs: Vec<usize> = vec![16, 20, 24];
        offs.extend((0..=nr.min(max - 1)).map(|i| 32 + 8 * i));
        offs.extend((0..=nr.min(max - 1)).map(|i| 32 + 8 * max + vsize * i));
        for off in offs {
            for v in [
                0u64,
                1,
                *b,
                details_root,
                mapping_root,
                nr_blocks - 1,
                u64::MAX,
                (1000 << 24) | 1,
                u32::MAX as u64,
            ] {
                let mut blk = orig.clone();
                let w = if off < 32 { 4 } else { 8 };
                blk[off..off + w].copy_from_slice(&v.to_le_bytes()[..w]);
                checksum::seal(&mut blk, BlockKind::BTreeNode);
                file.write_all_at(&blk, b * BLOCK_SIZE as u64).unwrap();
                let dev = BlockDevice::open(&path, OpenMode::ReadOnly).unwrap();
                for snap in [false, true] {
                    let _ = ls::list(&dev, snap, true, &mut |_, _| {});
                }
                let _ = rmap::rmap(&dev, std::slice::from_ref(&(0..u64::MAX)));
                runs += 1;
            }
        }
        file.write_all_at(orig, b * BLOCK_SIZE as u64).unwrap();
    }
    assert!(runs > 1000);
}

#[test]
fn an_impossible_data_device_size_is_damage_not_an_allocation() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = unpack(&fixture(), dir.path(), "meta.img");
    let file = open_rw(&path);
    let mut b = vec![0u8; 4096];
    file.read_exact_at(&mut b, 0).unwrap();
    b[64..72].copy_from_slice(&(1u64 << 50).to_le_bytes()); // data_sm_root.nr_blocks
    checksum::seal(&mut b, BlockKind::ThinSuperblock);
    file.write_all_at(&b, 0).unwrap();
    let p = path.to_str().unwrap();
    let out = run("thin_ls", &["-o", "DEV,SHARED_BLOCKS", p]);
    assert_one_line_error(&out, "thin_ls on a 2^50-block data device");
    assert_eq!(out.status.code(), Some(65));
    // Fields without counts do not need it.
    assert!(run("thin_ls", &["-o", "DEV", p]).status.success());
}
