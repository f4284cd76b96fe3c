//! Read-only tools never open their inputs for writing.
//!
//! Every tool (and every input of a writer that it only reads) is run on
//! inputs that cannot be opened for writing:
//! - files of mode 0444, the tools run as user `nobody` (an `O_RDWR` open
//!   fails with EACCES), and
//! - read-only loop devices (`losetup -r`: an `O_RDWR` open fails with
//!   EROFS), run as root.
//!
//! So a tool that succeeds opened them read-only (on the loop devices, where
//! this kernel refuses only the write, strace shows every open's flags); every
//! input is compared byte for byte before and after as well. Each premise (the open for writing
//! really fails) is checked too, so the test cannot pass vacuously. Skipped
//! with a note where setpriv or loop devices are missing.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A file's bytes (compared directly: hashing in a debug build is slow).
fn content(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

const SNAP_MAGIC: u32 = 0x7041_6e53;

/// A dm-snapshot COW store (FORMATS.md §8): chunks of 512 bytes, header
/// (valid, version 1), one metadata area with two exceptions, their data.
fn cow_store() -> Vec<u8> {
    let chunk = 512;
    let mut b = vec![0u8; 16 * chunk];
    for (i, v) in [SNAP_MAGIC, 1, 1, 1].iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&v.to_le_bytes());
    }
    for (i, (old, new)) in [(0u64, 2u64), (5, 3)].iter().enumerate() {
        let off = chunk + i * 16;
        b[off..off + 8].copy_from_slice(&old.to_le_bytes());
        b[off + 8..off + 16].copy_from_slice(&new.to_le_bytes());
    }
    for c in 2..4 {
        b[c * chunk..(c + 1) * chunk].fill(c as u8);
    }
    b
}

/// The inputs: kernel-small's metadata (with its held metadata snapshot)
/// and data, the same pool restored without a metadata snapshot (for
/// thin_shrink), its XML, a pack of it, a COW store and its origin.
struct Inputs {
    meta: PathBuf,
    data: PathBuf,
    plain: PathBuf,
    xml: PathBuf,
    pack: PathBuf,
    cow: PathBuf,
    origin: PathBuf,
}

impl Inputs {
    fn all(&self) -> [&Path; 7] {
        [
            &self.meta,
            &self.data,
            &self.plain,
            &self.xml,
            &self.pack,
            &self.cow,
            &self.origin,
        ]
    }
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_inputs(dir: &Path) -> Inputs {
    let meta = unpack(&fixture_dir().join("meta.img.gz"), dir, "meta.img");
    let data = unpack(&fixture_dir().join("data.img.gz"), dir, "data.img");
    let xml = dir.join("pool.xml");
    let out = run("thin_dump", &[s(&meta), "-o", s(&xml)]);
    ok(&out, "thin_dump");
    let plain = dir.join("plain.img");
    std::fs::File::create(&plain)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    ok(
        &run("thin_restore", &["-i", s(&xml), "-o", s(&plain)]),
        "thin_restore",
    );
    let pack = dir.join("pool.pack");
    ok(
        &run("thin_metadata_pack", &["-i", s(&meta), "-o", s(&pack)]),
        "thin_metadata_pack",
    );
    let cow = dir.join("cow.img");
    std::fs::write(&cow, cow_store()).unwrap();
    let origin = dir.join("origin.img");
    std::fs::write(&origin, vec![0x5au8; 8 * 512]).unwrap();
    Inputs {
        meta,
        data,
        plain,
        xml,
        pack,
        cow,
        origin,
    }
}

/// Every read: `(tool, args)`, the inputs at the paths of `i` (files or
/// read-only loop devices), whatever they write going to `out` (a writable
/// directory). Regular-file-only inputs (XML, pack) stay files.
fn cases(i: &Inputs, files: &Inputs, out: &Path) -> Vec<(&'static str, Vec<String>)> {
    let o = |name: &str| out.join(name).to_str().unwrap().to_string();
    let meta = s(&i.meta).to_string();
    let data = s(&i.data).to_string();
    let plain = s(&i.plain).to_string();
    let cow = s(&i.cow).to_string();
    let origin = s(&i.origin).to_string();
    let xml = s(&files.xml).to_string();
    let pack = s(&files.pack).to_string();
    let v = |a: &[&str]| a.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        ("thin_check", v(&[&meta])),
        ("thin_check", v(&["-m", &meta])),
        ("thin_check", v(&["--super-block-only", &meta])),
        ("thin_dump", v(&[&meta])),
        ("thin_dump", v(&["--repair", &meta])),
        ("thin_dump", v(&["-m", &meta])),
        ("thin_dump", v(&["-f", "json", &meta])),
        ("thin_ls", v(&[&meta])),
        ("thin_ls", v(&["-m", &meta])),
        ("thin_delta", v(&["--snap1", "1", "--snap2", "2", &meta])),
        ("thin_rmap", v(&["--region", "0..256", &meta])),
        (
            "thin_metadata_pack",
            v(&["-i", &meta, "-o", &o("out.pack")]),
        ),
        (
            "thin_extract",
            v(&["--metadata", &meta, "--data", &data, "--dev-id", "1"]),
        ),
        (
            "thin_extract",
            v(&[
                "--metadata",
                &meta,
                "--data",
                &data,
                "--dev-id",
                "1",
                "-m",
                "-o",
                &o("extract.img"),
            ]),
        ),
        ("thin_repair", v(&["-i", &meta, "-o", &o("repaired.img")])),
        (
            "thin_shrink",
            v(&[
                "--binary",
                "-i",
                &plain,
                "-o",
                &o("shrunk.img"),
                "--data",
                &data,
                "--nr-blocks",
                "256",
                "--no-copy",
            ]),
        ),
        (
            "thin_shrink",
            v(&[
                "-i",
                &xml,
                "-o",
                &o("shrunk.xml"),
                "--data",
                &data,
                "--nr-blocks",
                "256",
                "--no-copy",
            ]),
        ),
        // The writers' inputs: only read.
        ("thin_restore", v(&["-i", &xml, "-o", &o("restored.img")])),
        (
            "thin_metadata_unpack",
            v(&["-i", &pack, "-o", &o("unpacked.img")]),
        ),
        (
            "thin_trim",
            v(&["--metadata-dev", &meta, "--data-dev", &o("trim-data.img")]),
        ),
        (
            "thin_merge",
            v(&[
                "--metadata",
                &meta,
                "--data",
                &data,
                "--dev-id",
                "1",
                "--origin",
                &o("merge-origin.img"),
            ]),
        ),
        (
            "thin_merge",
            v(&[
                "--metadata",
                &meta,
                "--data",
                &data,
                "--dev-id",
                "1",
                "--origin",
                &origin,
                "--dry-run",
            ]),
        ),
        ("snap_check", v(&[&cow])),
        ("snap_check", v(&[&cow, "--origin", &origin])),
        ("snap_dump", v(&[&cow])),
        ("snap_dump", v(&["-f", "json", &cow])),
    ]
}

/// Fresh outputs in `out` for the cases that write (sized devices, a data
/// copy to trim, an origin to merge into), writable by anyone.
fn make_outputs(out: &Path, files: &Inputs) {
    for name in ["repaired.img", "shrunk.img", "restored.img", "unpacked.img"] {
        let p = out.join(name);
        std::fs::File::create(&p).unwrap().set_len(4 << 20).unwrap();
    }
    std::fs::copy(&files.data, out.join("trim-data.img")).unwrap();
    std::fs::write(out.join("merge-origin.img"), vec![0u8; 1 << 20]).unwrap();
    for e in std::fs::read_dir(out).unwrap() {
        let p = e.unwrap().path();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
}

fn setpriv() -> Option<&'static str> {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// `thinmeta TOOL args` as user nobody.
fn run_as_nobody(setpriv: &str, tool: &str, args: &[String]) -> Output {
    Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", bin()])
        .arg(tool)
        .args(args)
        .output()
        .unwrap()
}

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

#[test]
fn every_reader_works_on_read_only_files_as_an_unprivileged_user() {
    let Some(setpriv) = setpriv().filter(|_| is_root()) else {
        eprintln!("note: not root or no setpriv: read-only file test skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    let inputs = make_inputs(d);
    for p in inputs.all() {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444)).unwrap();
    }
    let before: Vec<Vec<u8>> = inputs.all().iter().map(|p| content(p)).collect();
    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    make_outputs(&out, &inputs);

    // The premise: as nobody, a tool that opens an input for writing is
    // refused (Permission denied), so success below means a read-only open.
    for (tool, args) in [
        ("thin_message", vec![s(&inputs.plain), "create_thin", "9"]),
        (
            "thin_restore",
            vec!["-i", s(&inputs.xml), "-o", s(&inputs.plain)],
        ),
        (
            "snap_merge",
            vec!["--origin", s(&inputs.origin), "--cow", s(&inputs.cow)],
        ),
    ] {
        let args: Vec<String> = args.iter().map(|x| x.to_string()).collect();
        let r = run_as_nobody(setpriv, tool, &args);
        assert_one_line_error(&r, tool);
        assert!(
            String::from_utf8_lossy(&r.stderr).contains("Permission denied"),
            "{tool}: {r:?}"
        );
    }

    let cases = cases(&inputs, &inputs, &out);
    assert!(cases.len() >= 25);
    for (tool, args) in &cases {
        let r = run_as_nobody(setpriv, tool, args);
        ok(&r, &format!("{tool} {args:?} as nobody on 0444 files"));
    }
    let after: Vec<Vec<u8>> = inputs.all().iter().map(|p| content(p)).collect();
    assert!(before == after, "an input changed");
    // The outputs were written (the tools did their work).
    assert!(std::fs::metadata(out.join("out.pack")).unwrap().len() > 0);
    assert!(std::fs::read_to_string(out.join("shrunk.xml"))
        .unwrap()
        .contains("nr_data_blocks=\"256\""));
}

#[test]
fn every_reader_works_on_read_only_loop_devices() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = make_inputs(d);
    let before: Vec<Vec<u8>> = files.all().iter().map(|p| content(p)).collect();
    let mut loops = Vec::new();
    for p in [
        &files.meta,
        &files.data,
        &files.plain,
        &files.cow,
        &files.origin,
    ] {
        match loop_device_ro(p) {
            Some(l) => loops.push(l),
            None => {
                eprintln!("note: no loop devices here: read-only loop device test skipped");
                return;
            }
        }
    }
    let dev = |i: usize| PathBuf::from(&loops[i].0);
    let devs = Inputs {
        meta: dev(0),
        data: dev(1),
        plain: dev(2),
        xml: files.xml.clone(),
        pack: files.pack.clone(),
        cow: dev(3),
        origin: dev(4),
    };
    // The premise: the kernel refuses writes to them (this kernel refuses
    // the write, older ones the open for writing with EROFS), so a tool
    // that wrote would fail.
    for l in &loops {
        use std::os::unix::fs::FileExt;
        let refused = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&l.0)
            .and_then(|f| f.write_all_at(&[0u8; 4096], 0))
            .unwrap_err();
        assert!(
            matches!(
                refused.raw_os_error(),
                Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES)
            ),
            "{}: {refused}",
            l.0
        );
    }
    let r = run("thin_message", &[&loops[2].0, "create_thin", "9"]);
    assert_one_line_error(&r, "thin_message on a read-only device");

    let out = d.join("out");
    std::fs::create_dir(&out).unwrap();
    make_outputs(&out, &files);
    for (tool, args) in &cases(&devs, &files, &out) {
        let a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
        ok(
            &run(tool, &a),
            &format!("{tool} {args:?} on read-only loop devices"),
        );
    }
    drop(loops);
    let after: Vec<Vec<u8>> = files.all().iter().map(|p| content(p)).collect();
    assert!(before == after, "an input changed");
}
