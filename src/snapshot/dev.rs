//! Byte-addressed access to the two devices of a dm-snapshot: the COW store
//! and the origin. Unlike thin metadata they are not made of 4 KiB blocks
//! (chunks can be 512 bytes, an origin can end in a partial chunk), so this
//! is a small layer of its own: `pread`/`pwrite` at byte offsets, a flush,
//! and the open rules of the tools.
//!
//! [`Store`] is the interface the reader, checker and merger use; tests
//! implement it in memory to model a disk's volatile write cache.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::pdata::io::{open_raw, OpenMode};

/// What the snapshot code needs from a device.
pub trait Store {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from byte `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write `buf` at byte `offset`. Not durable until [`Store::flush`].
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every completed write durable (the commit barrier).
    fn flush(&self) -> io::Result<()>;
    /// Start writing back `len` bytes at `offset` now, without waiting, so
    /// that the next [`Store::flush`] has less left to do. Only a hint.
    fn start_writeback(&self, _offset: u64, _len: u64) {}
}

/// How a tool opens a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read only, shared with other users.
    Read,
    /// Read only; refuse a device something else holds (a live snapshot):
    /// `O_EXCL` on a block device, a shared `flock` on a regular file.
    ReadExclusive,
    /// Read-write and exclusive (`O_EXCL`; an exclusive `flock` on a file).
    WriteExclusive,
}

pub use crate::pdata::io::OpenError;

/// An open file or block device.
pub struct Device {
    file: File,
    size: u64,
    path: PathBuf,
    writable: bool,
}

impl Device {
    /// Open `path`. Read-only opens accept a gzip-compressed image or a pipe
    /// (copied into an unlinked temporary file first).
    pub fn open(path: &Path, access: Access) -> Result<Device, OpenError> {
        let mode = match access {
            Access::Read => OpenMode::ReadOnly,
            Access::ReadExclusive => OpenMode::ReadOnlyExclusive,
            Access::WriteExclusive => OpenMode::ReadWriteExclusive,
        };
        let raw = open_raw(path, mode)?;
        Ok(Device {
            file: raw.file,
            size: raw.size,
            path: path.to_path_buf(),
            writable: access == Access::WriteExclusive,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }
}

impl Store for Device {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if !self.writable {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "device was opened read-only",
            ));
        }
        // Never grow a regular file: the device's size is part of its meaning.
        if !matches!(offset.checked_add(buf.len() as u64), Some(end) if end <= self.size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "write past the end of the device",
            ));
        }
        crate::pdata::io::write_at(&self.file, buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        crate::pdata::io::sync_data(&self.file)
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        // SAFETY: a plain syscall on a descriptor we own; failure is harmless
        // (the flush that follows does the work).
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
}

pub use crate::pdata::io::same_file;

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn exclusive_opens_of_a_file_exclude_each_other() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        let w = Device::open(f.path(), Access::WriteExclusive).unwrap();
        assert!(matches!(
            Device::open(f.path(), Access::WriteExclusive),
            Err(OpenError::Busy)
        ));
        assert!(matches!(
            Device::open(f.path(), Access::ReadExclusive),
            Err(OpenError::Busy)
        ));
        // A plain shared read is always allowed.
        let r = Device::open(f.path(), Access::Read).unwrap();
        assert_eq!(r.size(), 8192);
        drop(w);
        let _r2 = Device::open(f.path(), Access::ReadExclusive).unwrap();
    }

    #[test]
    fn writes_never_grow_the_device() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 1000]).unwrap();
        let d = Device::open(f.path(), Access::WriteExclusive).unwrap();
        assert!(d.write_at(&[1u8; 10], 995).is_err());
        d.write_at(&[1u8; 10], 990).unwrap();
        assert_eq!(d.size(), 1000);
    }

    #[test]
    fn gzip_images_are_read_unpacked_and_refused_for_writing() {
        let mut gz = tempfile::NamedTempFile::new().unwrap();
        let mut enc = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::fast());
        enc.write_all(&[3u8; 5000]).unwrap();
        enc.finish().unwrap();
        let d = Device::open(gz.path(), Access::Read).unwrap();
        assert_eq!(d.size(), 5000);
        assert!(matches!(
            Device::open(gz.path(), Access::WriteExclusive),
            Err(OpenError::Compressed)
        ));
    }
}
