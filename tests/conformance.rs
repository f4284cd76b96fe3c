//! Conformance with the peer (thin-provisioning-tools 1.3.3): every recorded
//! thin_dump / thin_check / thin_repair / thin_restore step on every image
//! under ../shared/testdata is replayed; dumps must be byte-identical, check
//! verdicts and stdout equal. Dumps of metadata we wrote (repaired_*,
//! restored_*) must equal the peer's up to the names of `<def>`s (block
//! numbers of shared leaves, which depend on where the writer put them).
//! Skipped (with a note) on a clone without ../shared.

mod common;

use std::path::{Path, PathBuf};

use common::*;

/// The tools whose recorded steps are replayed.
const REPLAYED: &[&str] = &[
    "thin_check",
    "thin_delta",
    "thin_dump",
    "thin_ls",
    "thin_repair",
    "thin_restore",
    "thin_rmap",
];

struct Step {
    name: String,
    rc: i32,
    tool: String,
    args: Vec<String>,
}

/// Parse `cmd.txt`: `step  rc=N  pdata_tools TOOL args...`.
fn steps(dir: &Path) -> Vec<Step> {
    let text = std::fs::read_to_string(dir.join("cmd.txt")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let name = w.next()?.to_string();
            let rc = w.next()?.strip_prefix("rc=")?.parse().ok()?;
            if w.next()? != "pdata_tools" {
                return None;
            }
            let tool = w.next()?.to_string();
            Some(Step {
                name,
                rc,
                tool,
                args: w.map(String::from).collect(),
            })
        })
        .collect()
}

/// Replay the dump and check steps of one folder whose images are gzip'd
/// next to it (or one level up for kernel scenarios).
fn replay(dir: &Path, image_dir: &Path, scratch: &Path) -> (usize, Vec<String>) {
    let mut failures = Vec::new();
    let mut n = 0;
    for s in steps(dir) {
        if !REPLAYED.contains(&s.tool.as_str()) {
            continue;
        }
        let mut args: Vec<String> = Vec::new();
        let mut output_next = false;
        for a in &s.args {
            if output_next {
                // An output device: a file as large as the input image.
                let p = scratch.join(a);
                let size = image_size(dir).unwrap_or(64 << 20);
                std::fs::File::create(&p).unwrap().set_len(size).unwrap();
                args.push(p.to_string_lossy().to_string());
                output_next = false;
                continue;
            }
            output_next = a == "-o";
            let base = Path::new(a)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .to_string();
            let gz = [
                image_dir.join(format!("{base}.gz")),
                dir.join(format!("{base}.gz")),
            ]
            .into_iter()
            .find(|p| p.exists());
            let arg = if scratch.join(&base).exists() && !a.starts_with('-') {
                scratch.join(&base).to_string_lossy().to_string()
            } else if let Some(gz) = gz {
                let p = scratch.join(&base);
                if !p.exists() {
                    unpack(&gz, scratch, &base);
                }
                p.to_string_lossy().to_string()
            } else if dir.join(a).is_file() {
                dir.join(a).to_string_lossy().to_string()
            } else {
                a.clone()
            };
            args.push(arg);
        }
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&s.tool, &argv);
        n += 1;
        let code = out.status.code().unwrap_or(-1);
        let what = format!("{}: {} {}", dir.display(), s.tool, s.args.join(" "));
        if (code == 0) != (s.rc == 0) {
            failures.push(format!(
                "{what}: exit {code}, peer {} ({})",
                s.rc,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            continue;
        }
        if code == 2 {
            failures.push(format!("{what}: exit status 2"));
        }
        if s.rc == 0 || s.tool == "thin_check" {
            let want = std::fs::read(dir.join(format!("{}.stdout", s.name))).unwrap();
            let ours_written = s.name.starts_with("repaired_") || s.name.starts_with("restored_");
            let same = if ours_written && s.tool == "thin_dump" {
                without_def_names(&out.stdout) == without_def_names(&want)
            } else {
                out.stdout == want
            };
            if !same {
                failures.push(format!(
                    "{what}: stdout differs from the peer's ({} vs {} bytes)",
                    out.stdout.len(),
                    want.len()
                ));
            }
        }
    }
    (n, failures)
}

/// A dump with every `<def name=..>` / `<ref name=..>` value blanked.
fn without_def_names(xml: &[u8]) -> String {
    let text = String::from_utf8_lossy(xml);
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let t = line.trim_start();
        if t.starts_with("<def name=") || t.starts_with("<ref name=") {
            let cut = line.find("name=\"").unwrap() + 6;
            let end = cut + line[cut..].find('"').unwrap();
            out.push_str(&line[..cut]);
            out.push_str(&line[end..]);
        } else {
            out.push_str(line);
        }
    }
    out
}

/// The raw image size recorded in `sb.txt`.
fn image_size(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join("sb.txt")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("file_size_bytes="))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn matches_the_peer_on_every_shared_image() {
    let Some(td) = shared_testdata() else {
        eprintln!("../shared/testdata not found: peer conformance skipped");
        return;
    };
    let scratch = tempfile::tempdir().unwrap();
    let mut total = 0;
    let mut failures = Vec::new();
    let mut folders: Vec<(PathBuf, PathBuf)> = Vec::new();
    for e in std::fs::read_dir(td.join("peer")).unwrap() {
        let d = e.unwrap().path();
        folders.push((d.clone(), d));
    }
    for e in std::fs::read_dir(td.join("kernel")).unwrap() {
        let d = e.unwrap().path();
        if d.join("peer/cmd.txt").exists() {
            folders.push((d.join("peer"), d));
        }
    }
    folders.sort();
    for (dir, images) in folders {
        let sub = scratch
            .path()
            .join(dir.parent().unwrap().file_name().unwrap())
            .join(dir.file_name().unwrap());
        std::fs::create_dir_all(&sub).unwrap();
        let (n, f) = replay(&dir, &images, &sub);
        total += n;
        failures.extend(f);
    }
    assert!(total >= 60, "only {total} peer steps found");
    assert!(
        failures.is_empty(),
        "{} of {total} steps differ from the peer:\n{}",
        failures.len(),
        failures.join("\n")
    );
    eprintln!("{total} peer steps replayed, all identical");
}
