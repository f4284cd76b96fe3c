//! The device-mapper control interface (`/dev/mapper/control` ioctls), for
//! the few things the tools ask of a live kernel: sending a target message,
//! reading a device's table.

use std::fs::OpenOptions;
use std::os::unix::io::AsRawFd;

/// `struct dm_ioctl` (include/uapi/linux/dm-ioctl.h): 312 bytes.
const DM_IOCTL_SIZE: usize = 312;
const DM_NAME_LEN: usize = 128;
const DM_VERSION_MAJOR: u32 = 4;
const DM_IOCTL_TYPE: u64 = 0xfd;
const DM_TARGET_MSG_CMD: u64 = 14;
/// `DM_DATA_OUT_FLAG`: the kernel put a reply in the buffer.
const DM_DATA_OUT_FLAG: u32 = 1 << 16;
/// `DM_BUFFER_FULL_FLAG`: the reply did not fit.
const DM_BUFFER_FULL_FLAG: u32 = 1 << 8;

/// `_IOWR(0xfd, cmd, struct dm_ioctl)`.
const fn iowr(cmd: u64) -> u64 {
    (3 << 30) | ((DM_IOCTL_SIZE as u64) << 16) | (DM_IOCTL_TYPE << 8) | cmd
}

#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error("cannot open /dev/mapper/control: {0}")]
    Control(std::io::Error),
    #[error("device name '{0}' is too long (at most 127 bytes)")]
    NameTooLong(String),
    #[error("reading the device-mapper table of device {}:{}: {source}", libc::major(*rdev), libc::minor(*rdev))]
    Table { rdev: u64, source: std::io::Error },
    #[error("message to {name} failed: {source}")]
    Message {
        name: String,
        source: std::io::Error,
    },
}

/// Send `message` to sector 0 of the device-mapper device `name` (what
/// `dmsetup message NAME 0 MESSAGE` does). Returns the target's reply, if any.
pub fn target_message(name: &str, message: &str) -> Result<Option<String>, DmError> {
    if name.len() >= DM_NAME_LEN {
        return Err(DmError::NameTooLong(name.into()));
    }
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .map_err(DmError::Control)?;
    // dm_ioctl, then struct dm_target_msg { u64 sector; char message[]; },
    // with room for a reply.
    let data_start = DM_IOCTL_SIZE;
    let size = (data_start + 8 + message.len() + 1).max(16 * 1024);
    let mut buf = vec![0u8; size];
    let put32 =
        |b: &mut [u8], off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut buf, 0, DM_VERSION_MAJOR);
    put32(&mut buf, 4, 0);
    put32(&mut buf, 8, 0);
    put32(&mut buf, 12, size as u32); // data_size
    put32(&mut buf, 16, data_start as u32); // data_start
    buf[48..48 + name.len()].copy_from_slice(name.as_bytes());
    // sector 0 (already zero), then the message, NUL-terminated.
    let m = data_start + 8;
    buf[m..m + message.len()].copy_from_slice(message.as_bytes());
    // SAFETY: the buffer is a dm_ioctl followed by its data, `size` bytes
    // long as data_size says; the kernel writes only within data_size.
    let r = unsafe {
        libc::ioctl(
            control.as_raw_fd(),
            iowr(DM_TARGET_MSG_CMD) as libc::c_ulong,
            buf.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(DmError::Message {
            name: name.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    let flags = u32::from_le_bytes(buf[28..32].try_into().unwrap());
    if flags & DM_DATA_OUT_FLAG == 0 || flags & DM_BUFFER_FULL_FLAG != 0 {
        return Ok(None);
    }
    let start = u32::from_le_bytes(buf[16..20].try_into().unwrap()) as usize;
    let reply = &buf[start.min(size)..];
    let end = reply.iter().position(|&c| c == 0).unwrap_or(reply.len());
    Ok(Some(String::from_utf8_lossy(&reply[..end]).into_owned()))
}

/// `DM_TABLE_STATUS`: a device's table or status.
const DM_TABLE_STATUS_CMD: u64 = 12;
/// `DM_STATUS_TABLE_FLAG`: return the table, not the status.
const DM_STATUS_TABLE_FLAG: u32 = 1 << 4;
/// `DM_READONLY_FLAG`: the device is read-only.
const DM_READONLY_FLAG: u32 = 1;
/// `struct dm_target_spec`: sector_start, length (u64), status (i32),
/// next (u32), target_type (char[16]); the parameters follow, NUL-ended.
const DM_TARGET_SPEC_SIZE: usize = 40;

/// One target line of a device's live table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmTarget {
    pub start: u64,
    pub length: u64,
    pub target_type: String,
    pub params: String,
}

/// A device-mapper device's live table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmTable {
    pub name: String,
    pub read_only: bool,
    pub targets: Vec<DmTarget>,
}

/// The live table of the device-mapper device with device number `rdev`
/// (`st_rdev` of its node), as `dmsetup table` prints it. `Ok(None)`: no
/// device-mapper device has that number.
pub fn table_by_dev(rdev: u64) -> Result<Option<DmTable>, DmError> {
    let control = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")
        .map_err(DmError::Control)?;
    let mut size = 16 * 1024;
    loop {
        let mut buf = vec![0u8; size];
        let put32 =
            |b: &mut [u8], off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put32(&mut buf, 0, DM_VERSION_MAJOR);
        put32(&mut buf, 12, size as u32); // data_size
        put32(&mut buf, 16, DM_IOCTL_SIZE as u32); // data_start
        put32(&mut buf, 28, DM_STATUS_TABLE_FLAG); // flags
        buf[40..48].copy_from_slice(&rdev.to_le_bytes()); // dev
                                                          // SAFETY: the buffer is a dm_ioctl followed by its data, `size`
                                                          // bytes long as data_size says; the kernel writes only within it.
        let r = unsafe {
            libc::ioctl(
                control.as_raw_fd(),
                iowr(DM_TABLE_STATUS_CMD) as libc::c_ulong,
                buf.as_mut_ptr(),
            )
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(DmError::Table { rdev, source: e });
        }
        let u32_at = |off: usize| u32::from_le_bytes(buf[off..off + 4].try_into().unwrap());
        let flags = u32_at(28);
        if flags & DM_BUFFER_FULL_FLAG != 0 {
            if size >= 64 << 20 {
                return Err(DmError::Table {
                    rdev,
                    source: std::io::Error::other("the table does not fit in 64 MiB"),
                });
            }
            size *= 4;
            continue;
        }
        return Ok(Some(parse_table(&buf, flags & DM_READONLY_FLAG != 0)));
    }
}

/// The table in a `DM_TABLE_STATUS` reply.
fn parse_table(buf: &[u8], read_only: bool) -> DmTable {
    let u32_at = |off: usize| u32::from_le_bytes(buf[off..off + 4].try_into().unwrap()) as usize;
    let u64_at = |off: usize| u64::from_le_bytes(buf[off..off + 8].try_into().unwrap());
    let cstr = |b: &[u8]| {
        let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    let name = cstr(&buf[48..48 + DM_NAME_LEN]);
    let data_start = u32_at(16);
    let data_size = u32_at(12).min(buf.len());
    let count = u32_at(20);
    let mut targets = Vec::new();
    // Each spec's `next`: its successor's offset from the first spec.
    let mut off = data_start;
    for _ in 0..count {
        if off + DM_TARGET_SPEC_SIZE > data_size {
            break;
        }
        let spec = &buf[off..];
        targets.push(DmTarget {
            start: u64_at(off),
            length: u64_at(off + 8),
            target_type: cstr(&spec[24..40]),
            params: cstr(&buf[off + DM_TARGET_SPEC_SIZE..data_size]),
        });
        let next = u32_at(off + 20);
        if data_start + next <= off {
            break;
        }
        off = data_start + next;
    }
    DmTable {
        name,
        read_only,
        targets,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_ioctl_number_is_dm_target_msg() {
        // DM_TARGET_MSG as the kernel headers define it on x86_64.
        assert_eq!(super::iowr(super::DM_TARGET_MSG_CMD), 0xc138_fd0e);
        assert_eq!(super::iowr(super::DM_TABLE_STATUS_CMD), 0xc138_fd0c);
    }

    #[test]
    fn a_table_status_reply_is_read_target_by_target() {
        use super::*;
        // What the kernel returns for a two-target table: dm_ioctl, then
        // each dm_target_spec with its parameters, `next` counted from the
        // first spec.
        let mut buf = vec![0u8; 1024];
        let put32 =
            |b: &mut [u8], off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
        put32(&mut buf, 12, 1024);
        put32(&mut buf, 16, DM_IOCTL_SIZE as u32);
        put32(&mut buf, 20, 2);
        buf[48..52].copy_from_slice(b"vg-x");
        let mut off = DM_IOCTL_SIZE;
        for (start, len, kind, params) in [(0u64, 8u64, "thin", "254:2 7"), (8, 16, "zero", "")] {
            buf[off..off + 8].copy_from_slice(&start.to_le_bytes());
            buf[off + 8..off + 16].copy_from_slice(&len.to_le_bytes());
            buf[off + 24..off + 24 + kind.len()].copy_from_slice(kind.as_bytes());
            let p = off + DM_TARGET_SPEC_SIZE;
            buf[p..p + params.len()].copy_from_slice(params.as_bytes());
            let next = (p + params.len() + 1).next_multiple_of(8);
            put32(&mut buf, off + 20, (next - DM_IOCTL_SIZE) as u32);
            off = next;
        }
        let t = parse_table(&buf, true);
        assert_eq!(t.name, "vg-x");
        assert!(t.read_only);
        assert_eq!(
            t.targets,
            vec![
                DmTarget {
                    start: 0,
                    length: 8,
                    target_type: "thin".into(),
                    params: "254:2 7".into()
                },
                DmTarget {
                    start: 8,
                    length: 16,
                    target_type: "zero".into(),
                    params: "".into()
                },
            ]
        );
    }
}
