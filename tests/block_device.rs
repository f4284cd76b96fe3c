//! On a real block device (a loop device), live metadata held open
//! exclusively (as by an active pool) is refused by readers and writers,
//! while -m still reads it.
//! Skipped where loop devices cannot be set up (not root, no loop module).

mod common;

use std::os::unix::fs::OpenOptionsExt;
use std::process::Command;

use common::*;

struct Loop(String);
impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

#[test]
fn a_device_in_use_is_refused_unless_reading_the_metadata_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let img = unpack(&fixture_dir().join("meta.img.gz"), dir.path(), "meta.img");
    let out = match Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&img)
        .output()
    {
        Ok(o) if o.status.success() => o,
        _ => {
            eprintln!("no loop devices here: block-device test skipped");
            return;
        }
    };
    let dev = Loop(String::from_utf8(out.stdout).unwrap().trim().to_string());

    let free = run("thin_check", &[&dev.0]);
    assert!(
        free.status.success(),
        "{}",
        String::from_utf8_lossy(&free.stderr)
    );

    // Hold it the way the kernel holds a live pool's metadata device.
    let _held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_EXCL)
        .open(&dev.0)
        .unwrap();
    for tool in ["thin_check", "thin_dump"] {
        let out = run(tool, &[&dev.0]);
        assert_eq!(
            out.status.code(),
            Some(75),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    }
    // Writers refuse it too, and write nothing.
    let xml = dir.path().join("a.xml");
    std::fs::write(&xml, run("thin_dump", &[img.to_str().unwrap()]).stdout).unwrap();
    let other = unpack(&fixture_dir().join("meta.img.gz"), dir.path(), "other.img");
    let before = std::fs::read(&img).unwrap();
    for (tool, args) in [
        (
            "thin_restore",
            vec!["-i", xml.to_str().unwrap(), "-o", &dev.0],
        ),
        (
            "thin_repair",
            vec!["-i", other.to_str().unwrap(), "-o", &dev.0],
        ),
        ("thin_check", vec!["--auto-repair", &dev.0]),
    ] {
        let out = run(tool, &args);
        assert_eq!(
            out.status.code(),
            Some(75),
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_eq!(std::fs::read(&img).unwrap(), before);
    let snap = run("thin_dump", &["-m", &dev.0]);
    assert!(
        snap.status.success(),
        "{}",
        String::from_utf8_lossy(&snap.stderr)
    );
    assert!(String::from_utf8_lossy(&snap.stdout).contains("<device dev_id=\"1\""));
}
