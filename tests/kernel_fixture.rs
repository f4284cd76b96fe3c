//! The project's own kernel-written pool (tests/data/kernel-small, made by
//! tests/kernel/make-fixtures under qemu): our dump must rebuild every thin
//! device exactly as the kernel read it, live and through the metadata
//! snapshot, and our check must agree with the kernel's status lines.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use common::*;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, Copy)]
struct Run {
    origin: u64,
    data: u64,
    len: u64,
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

/// Device id -> mapping runs, with `<ref>`s resolved through the `<def>`s.
fn parse_dump(xml: &str) -> BTreeMap<u64, Vec<Run>> {
    let mut defs: HashMap<String, Vec<Run>> = HashMap::new();
    let mut devs = BTreeMap::new();
    let mut cur: Option<(Option<String>, Option<u64>, Vec<Run>)> = None;
    for line in xml.lines().map(str::trim) {
        if line.starts_with("<def ") {
            cur = Some((Some(attr_str(line, "name").to_string()), None, Vec::new()));
        } else if line.starts_with("<device ") {
            cur = Some((None, Some(attr(line, "dev_id")), Vec::new()));
        } else if line.starts_with("<single_mapping") {
            let r = Run {
                origin: attr(line, "origin_block"),
                data: attr(line, "data_block"),
                len: 1,
            };
            cur.as_mut().unwrap().2.push(r);
        } else if line.starts_with("<range_mapping") {
            let r = Run {
                origin: attr(line, "origin_begin"),
                data: attr(line, "data_begin"),
                len: attr(line, "length"),
            };
            cur.as_mut().unwrap().2.push(r);
        } else if line.starts_with("<ref ") {
            let runs = defs[attr_str(line, "name")].clone();
            cur.as_mut().unwrap().2.extend(runs);
        } else if line == "</def>" {
            let (name, _, runs) = cur.take().unwrap();
            defs.insert(name.unwrap(), runs);
        } else if line == "</device>" {
            let (_, id, runs) = cur.take().unwrap();
            devs.insert(id.unwrap(), runs);
        }
    }
    devs
}

fn dump(args: &[&str]) -> String {
    let out = run("thin_dump", args);
    assert!(
        out.status.success(),
        "thin_dump {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn rebuild_sha(runs: &[Run], data: &[u8], sectors: u64, block_bytes: u64) -> String {
    let mut dev = vec![0u8; (sectors * 512) as usize];
    for r in runs {
        for i in 0..r.len {
            let src = ((r.data + i) * block_bytes) as usize;
            let dst = ((r.origin + i) * block_bytes) as usize;
            if dst >= dev.len() {
                continue;
            }
            let n = (block_bytes as usize).min(dev.len() - dst);
            dev[dst..dst + n].copy_from_slice(&data[src..src + n]);
        }
    }
    format!("{:x}", Sha256::digest(&dev))
}

#[test]
fn dump_rebuilds_every_device_as_the_kernel_read_it() {
    let dir = fixture_dir();
    let meta = dir.join("meta.img.gz");
    let meta = meta.to_str().unwrap();
    let data = gunzip(&dir.join("data.img.gz"));
    let live = dump(&[meta]);
    let snap = dump(&["-m", meta]);
    assert!(live.starts_with("<superblock uuid=\"\" time=\"2\" transaction=\"5\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"256\">"));
    // The metadata snapshot's superblock copy has no space maps (as the peer prints it).
    assert!(snap.contains("nr_data_blocks=\"0\""));
    let block_bytes = 128 * 512;
    let live = parse_dump(&live);
    let snap = parse_dump(&snap);

    let expect = std::fs::read_to_string(dir.join("expect")).unwrap();
    let mut checked = 0;
    for line in expect.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (label, sectors, sha) = (f[0], f[1].parse::<u64>().unwrap(), f[2]);
        let (view, dev) = label.split_once(".thin").unwrap();
        let id: u64 = dev.parse().unwrap();
        let runs = match view {
            "final" => &live[&id],
            "metasnap" => &snap[&id],
            other => panic!("unknown label {other}"),
        };
        assert_eq!(
            rebuild_sha(runs, &data, sectors, block_bytes),
            sha,
            "{label}"
        );
        checked += 1;
    }
    assert_eq!(checked, 8);
}

#[test]
fn counts_agree_with_the_kernels_status_lines() {
    let dir = fixture_dir();
    let meta = dir.join("meta.img.gz");
    let meta = meta.to_str().unwrap();
    let status = std::fs::read_to_string(dir.join("status")).unwrap();
    let xml = dump(&[meta]);
    let live = parse_dump(&xml);

    // thinN: <start> <len> thin <mapped sectors> <highest mapped sector>
    for line in status.lines().filter(|l| l.starts_with("thin")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let id: u64 = f[0]
            .trim_start_matches("thin")
            .trim_end_matches(':')
            .parse()
            .unwrap();
        let mapped_sectors: u64 = f[4].parse().unwrap();
        let mapped: u64 = live[&id].iter().map(|r| r.len).sum();
        assert_eq!(mapped * 128, mapped_sectors, "thin{id}");
        let details = xml
            .lines()
            .find(|l| l.contains(&format!("<device dev_id=\"{id}\"")))
            .unwrap();
        assert_eq!(
            attr(details, "mapped_blocks"),
            mapped,
            "thin{id} mapped_blocks"
        );
    }

    // pool: ... thin-pool <trans id> <used meta>/<total meta> <used data>/<total data> <held root> ...
    let pool: Vec<&str> = status
        .lines()
        .find(|l| l.starts_with("pool"))
        .unwrap()
        .split_whitespace()
        .collect();
    let trans: u64 = pool[4].parse().unwrap();
    let (meta_used, meta_total) = pool[5].split_once('/').unwrap();
    let (data_used, data_total) = pool[6].split_once('/').unwrap();
    let held: u64 = pool[7].parse().unwrap();

    let out = run("thin_check", &[meta]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains(&format!("TRANSACTION_ID={trans}\n")));
    let free: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("METADATA_FREE_BLOCKS="))
        .unwrap()
        .parse()
        .unwrap();
    let total: u64 = meta_total.parse().unwrap();
    // The kernel reports min(4096, total/10) blocks of its commit reserve as used.
    let reserve = (total / 10).min(4096);
    assert_eq!(total - free + reserve, meta_used.parse::<u64>().unwrap());

    // Data blocks in use = those the live trees or the metadata snapshot reference.
    let snap = parse_dump(&dump(&["-m", meta]));
    let used: BTreeSet<u64> = live
        .values()
        .chain(snap.values())
        .flatten()
        .flat_map(|r| r.data..r.data + r.len)
        .collect();
    assert_eq!(used.len() as u64, data_used.parse::<u64>().unwrap());
    assert!(xml.contains(&format!("nr_data_blocks=\"{data_total}\"")));
    assert!(held > 0);
}

#[test]
fn json_dump_describes_the_same_mappings() {
    let meta = fixture_dir().join("meta.img.gz");
    let meta = meta.to_str().unwrap();
    let xml = parse_dump(&dump(&[meta]));
    let json: serde_json::Value =
        serde_json::from_str(&dump(&["-f", "json", meta])).expect("valid JSON");
    assert_eq!(json["superblock"]["transaction"], 5);
    assert_eq!(json["superblock"]["data_block_size"], 128);
    let defs: HashMap<String, Vec<serde_json::Value>> = json["defs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["mappings"].as_array().unwrap().clone(),
            )
        })
        .collect();
    let devices = json["devices"].as_array().unwrap();
    assert_eq!(devices.len(), xml.len());
    for d in devices {
        let id = d["dev_id"].as_u64().unwrap();
        let mut total = 0;
        for m in d["mappings"].as_array().unwrap() {
            match m.get("ref") {
                Some(r) => {
                    total += defs[r.as_str().unwrap()]
                        .iter()
                        .map(|x| x["length"].as_u64().unwrap())
                        .sum::<u64>()
                }
                None => total += m["length"].as_u64().unwrap(),
            }
        }
        assert_eq!(
            total,
            xml[&id].iter().map(|r| r.len).sum::<u64>(),
            "device {id}"
        );
        assert_eq!(d["mapped_blocks"].as_u64().unwrap(), total);
    }
}

#[test]
fn check_passes_live_and_through_the_metadata_snapshot() {
    let meta = fixture_dir().join("meta.img.gz");
    let meta = meta.to_str().unwrap();
    for args in [
        vec![meta],
        vec!["-m", meta],
        vec!["--skip-mappings", meta],
        vec!["--super-block-only", meta],
        vec!["-q", meta],
    ] {
        let out = run("thin_check", &args);
        assert!(
            out.status.success(),
            "thin_check {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let q = run("thin_check", &["-q", meta]);
    assert!(
        q.stdout.is_empty() && q.stderr.is_empty(),
        "-q prints nothing"
    );
}

#[test]
fn dev_id_selects_devices_without_defs() {
    let meta = fixture_dir().join("meta.img.gz");
    let meta = meta.to_str().unwrap();
    let one = dump(&["--dev-id", "3", meta]);
    assert!(!one.contains("<def"), "a single device shares nothing");
    assert_eq!(one.matches("<device ").count(), 1);
    let two = dump(&["--dev-id", "3", "--dev-id", "4", meta]);
    assert_eq!(
        two.matches("<ref name=").count(),
        2,
        "3 and 4 share their only leaf"
    );
}
