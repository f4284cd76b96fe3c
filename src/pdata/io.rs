//! Block I/O on regular files and block devices, in 4 KiB metadata blocks.
//!
//! Reads go through `pread`, single blocks or sorted, coalesced runs
//! ([`BlockDevice::read_in_order`]); the walkers visit each node once, so
//! batching the reads in block order is the read-ahead, and memory stays at
//! one bounded batch buffer however large the device is.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::error::{Error, Result};
use super::BLOCK_SIZE;

/// How a tool opens its metadata device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Read only, shared: for reading a metadata snapshot of a live pool (`-m`).
    ReadOnly,
    /// Read only, and refuse a block device that something else holds open
    /// (a live pool): `O_EXCL` on a block device fails with EBUSY then.
    ReadOnlyExclusive,
    /// Read-write and exclusive: for tools that write.
    ReadWriteExclusive,
}

/// Why a device could not be opened; the command edge turns these into messages.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("no such file or device")]
    NotFound,
    #[error("is a directory: Not a block device or regular file")]
    IsDirectory,
    #[error("device is in use (held open by a live pool or snapshot, mounted, or locked by another thinmeta tool)")]
    Busy,
    #[error("Permission denied")]
    PermissionDenied,
    #[error("Metadata device/file too small.  Is this binary metadata? ({0} bytes; thin metadata needs at least one 4096-byte block)")]
    TooSmall(u64),
    #[error("is gzip-compressed; unpack it before writing to it")]
    Compressed,
    #[error("is a pipe or other stream; writing needs a file or block device")]
    NotSeekable,
    #[error("{0}")]
    Io(std::io::Error),
}

impl From<std::io::Error> for OpenError {
    fn from(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::ENOENT) => OpenError::NotFound,
            Some(libc::EISDIR) => OpenError::IsDirectory,
            Some(libc::EBUSY) | Some(libc::EWOULDBLOCK) => OpenError::Busy,
            Some(libc::EACCES) | Some(libc::EPERM) => OpenError::PermissionDenied,
            _ => OpenError::Io(e),
        }
    }
}

/// An open file or block device, before any structure is put on it.
pub struct RawDevice {
    pub file: File,
    /// Size in bytes.
    pub size: u64,
    pub is_block_device: bool,
}

/// Open `path` by the rules every tool shares:
/// - exclusive modes refuse a device something else holds: `O_EXCL` on a
///   block device (EBUSY while the kernel, a live pool or snapshot, holds
///   it), and an advisory `flock` on a regular file (shared for reading,
///   exclusive for writing), so two thinmeta tools never write one image;
/// - read-only opens accept a gzip-compressed image or a pipe, unpacked or
///   copied into an unlinked temporary file; writable opens refuse both.
pub fn open_raw(path: &Path, mode: OpenMode) -> std::result::Result<RawDevice, OpenError> {
    let md = std::fs::metadata(path)?;
    if md.is_dir() {
        return Err(OpenError::IsDirectory);
    }
    let is_block_device = md.file_type().is_block_device();
    let writable = mode == OpenMode::ReadWriteExclusive;
    let mut opts = OpenOptions::new();
    opts.read(true).write(writable);
    // O_EXCL without O_CREAT is only defined for block devices (Linux).
    if is_block_device && mode != OpenMode::ReadOnly {
        opts.custom_flags(libc::O_EXCL);
    }
    let mut file = opts.open(path)?;
    if md.file_type().is_file() && mode != OpenMode::ReadOnly {
        let op = if writable {
            libc::LOCK_EX
        } else {
            libc::LOCK_SH
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe {
            libc::flock(
                std::os::unix::io::AsRawFd::as_raw_fd(&file),
                op | libc::LOCK_NB,
            )
        } != 0
        {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    let size = match file.seek(SeekFrom::End(0)) {
        Ok(s) => s,
        // A pipe (`thin_check <(zcat meta.gz)`): read it into a temporary file.
        Err(e) if e.raw_os_error() == Some(libc::ESPIPE) && !writable => {
            let mut tmp = tempfile::tempfile()?;
            std::io::copy(&mut file, &mut tmp)?;
            file = tmp;
            file.seek(SeekFrom::End(0))?
        }
        Err(e) if e.raw_os_error() == Some(libc::ESPIPE) => return Err(OpenError::NotSeekable),
        Err(e) => return Err(e.into()),
    };
    let mut size = size;
    if !is_block_device && size >= GZIP_HEADER_LEN {
        let mut head = vec![0u8; size.min(BLOCK_SIZE as u64) as usize];
        file.read_exact_at(&mut head, 0)?;
        if is_gzip(&head) {
            if writable {
                return Err(OpenError::Compressed);
            }
            file = gunzip_to_tempfile(&file)?;
            size = file.seek(SeekFrom::End(0))?;
        }
    }
    Ok(RawDevice {
        file,
        size,
        is_block_device,
    })
}

pub struct BlockDevice {
    file: File,
    nr_blocks: u64,
    path: PathBuf,
    writable: bool,
}

/// Bytes of a gzip member header that [`is_gzip`] looks at.
const GZIP_HEADER_LEN: u64 = 4;

/// Whether `head` (the first block, or all of a shorter file) starts a gzip
/// stream (RFC 1952: ID1 ID2, CM = 8 deflate, no reserved FLG bits) rather
/// than metadata. The two magic bytes alone are not enough: a superblock's
/// checksum starts with them once in 65,536 pools, so a block carrying a
/// valid metadata checksum is never taken for gzip.
fn is_gzip(head: &[u8]) -> bool {
    head.len() as u64 >= GZIP_HEADER_LEN
        && head[..3] == [0x1f, 0x8b, 0x08]
        && head[3] & 0xe0 == 0
        && (head.len() < BLOCK_SIZE || crate::pdata::checksum::identify(head).is_none())
}

impl BlockDevice {
    /// Open `path` by the rules of [`open_raw`], as 4 KiB blocks.
    pub fn open(path: &Path, mode: OpenMode) -> std::result::Result<BlockDevice, OpenError> {
        let raw = open_raw(path, mode)?;
        if raw.size < BLOCK_SIZE as u64 {
            return Err(OpenError::TooSmall(raw.size));
        }
        Ok(BlockDevice {
            file: raw.file,
            nr_blocks: raw.size / BLOCK_SIZE as u64,
            path: path.to_path_buf(),
            writable: mode == OpenMode::ReadWriteExclusive,
        })
    }

    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_writable(&self) -> bool {
        self.writable
    }

    fn check_bounds(&self, block: u64, count: u64) -> Result<()> {
        if block >= self.nr_blocks || count > self.nr_blocks - block {
            let bad = if block >= self.nr_blocks {
                block
            } else {
                self.nr_blocks
            };
            return Err(Error::OutOfBounds {
                block: bad,
                nr_blocks: self.nr_blocks,
            });
        }
        Ok(())
    }

    /// Read one block into `buf` (4096 bytes).
    pub fn read_block(&self, block: u64, buf: &mut [u8]) -> Result<()> {
        debug_assert_eq!(buf.len(), BLOCK_SIZE);
        self.read_run(block, buf)
    }

    /// Read `buf.len() / 4096` consecutive blocks starting at `first`.
    pub fn read_run(&self, first: u64, buf: &mut [u8]) -> Result<()> {
        let count = (buf.len() / BLOCK_SIZE) as u64;
        self.check_bounds(first, count)?;
        self.file
            .read_exact_at(buf, first * BLOCK_SIZE as u64)
            .map_err(|source| Error::Io {
                block: first,
                source,
            })
    }

    /// Write one block. Only for devices opened [`OpenMode::ReadWriteExclusive`].
    pub fn write_block(&self, block: u64, buf: &[u8]) -> Result<()> {
        debug_assert_eq!(buf.len(), BLOCK_SIZE);
        self.check_bounds(block, 1)?;
        if !self.writable {
            return Err(Error::Other("device was opened read-only".into()));
        }
        write_at(&self.file, buf, block * BLOCK_SIZE as u64)
            .map_err(|source| Error::WriteIo { block, source })
    }

    /// Write `buf.len() / 4096` consecutive blocks starting at `first`.
    pub fn write_run(&self, first: u64, buf: &[u8]) -> Result<()> {
        let count = (buf.len() / BLOCK_SIZE) as u64;
        self.check_bounds(first, count)?;
        if !self.writable {
            return Err(Error::Other("device was opened read-only".into()));
        }
        write_at(&self.file, buf, first * BLOCK_SIZE as u64).map_err(|source| Error::WriteIo {
            block: first,
            source,
        })?;
        start_writeback(&self.file, first * BLOCK_SIZE as u64, buf.len() as u64);
        Ok(())
    }

    /// Flush written blocks to stable storage (the commit barrier).
    pub fn sync(&self) -> Result<()> {
        sync_data(&self.file).map_err(Error::Flush)
    }

    /// Read `sorted` (increasing, distinct block numbers) into `buf`, block
    /// `sorted[k]` at `buf[k * 4096..]`, as runs of consecutive blocks, one
    /// `pread` a run. `failed[k]` is set to the error of each block that
    /// could not be read (None for the others).
    pub fn read_sorted(&self, sorted: &[u64], buf: &mut [u8], failed: &mut Vec<Option<Error>>) {
        debug_assert!(sorted.windows(2).all(|w| w[0] < w[1]));
        failed.clear();
        failed.resize_with(sorted.len(), || None);
        let mut i = 0;
        while i < sorted.len() {
            let mut j = i + 1;
            while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
                j += 1;
            }
            let run = &mut buf[i * BLOCK_SIZE..j * BLOCK_SIZE];
            if self.read_run(sorted[i], run).is_err() {
                // Find out exactly which blocks of the run are bad.
                for k in i..j {
                    let slot = &mut buf[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE];
                    if let Err(e) = self.read_block(sorted[k], slot) {
                        failed[k] = Some(e);
                    }
                }
            }
            i = j;
        }
    }

    /// Visit `blocks` in the given order, reading them in batches of at most
    /// `batch` blocks: each batch is sorted, deduplicated and read as runs of
    /// consecutive blocks, one `pread` a run. `f` gets the index into
    /// `blocks`, the block number, and its bytes or the error reading it.
    pub fn read_in_order<E, F>(
        &self,
        blocks: &[u64],
        batch: usize,
        f: F,
    ) -> std::result::Result<(), E>
    where
        F: FnMut(usize, u64, Result<&[u8]>) -> std::result::Result<(), E>,
    {
        self.read_in_order_with(&mut ReadScratch::default(), blocks, batch, f)
    }

    /// [`BlockDevice::read_in_order`] with buffers kept in `scratch` for the
    /// next call (for callers reading a few blocks at a time, many times:
    /// a fresh buffer each time is fresh pages each time).
    pub fn read_in_order_with<E, F>(
        &self,
        scratch: &mut ReadScratch,
        blocks: &[u64],
        batch: usize,
        mut f: F,
    ) -> std::result::Result<(), E>
    where
        F: FnMut(usize, u64, Result<&[u8]>) -> std::result::Result<(), E>,
    {
        let batch = batch.max(1);
        let ReadScratch {
            buf,
            sorted,
            failed,
        } = scratch;
        let need = batch.min(blocks.len().max(1)) * BLOCK_SIZE;
        if buf.len() < need {
            buf.resize(need, 0);
        }
        for (chunk_no, chunk) in blocks.chunks(batch).enumerate() {
            sorted.clear();
            sorted.extend_from_slice(chunk);
            sorted.sort_unstable();
            sorted.dedup();
            self.read_sorted(sorted, buf, failed);
            // Already sorted and distinct (the usual case): slot = position.
            let in_place = sorted.as_slice() == chunk;
            for (off, &b) in chunk.iter().enumerate() {
                let slot = if in_place {
                    off
                } else {
                    sorted.binary_search(&b).unwrap()
                };
                let res = match &failed[slot] {
                    None => Ok(&buf[slot * BLOCK_SIZE..(slot + 1) * BLOCK_SIZE]),
                    Some(e) => Err(e.clone()),
                };
                f(chunk_no * batch + off, b, res)?;
            }
        }
        Ok(())
    }
}

/// Buffers of [`BlockDevice::read_in_order_with`], kept between calls.
#[derive(Default)]
pub struct ReadScratch {
    buf: Vec<u8>,
    sorted: Vec<u64>,
    /// Per sorted slot: None = read fine, Some(err) = failed.
    failed: Vec<Option<Error>>,
}

//------------------------------------------------------------------------------
// The one path every writer's bytes take to a device

/// Write all of `buf` at byte `offset` of `file` (not durable until a
/// flush). Every tool that writes a device (metadata, data, origin, COW
/// store, unpacked image) writes through here, so that [`record`] sees it.
pub fn write_at(file: &File, buf: &[u8], offset: u64) -> std::io::Result<()> {
    file.write_all_at(buf, offset)?;
    record::note(file, || record::Op::Write {
        offset,
        bytes: buf.to_vec(),
    });
    Ok(())
}

/// Start writing `len` bytes at `offset` back to the device without waiting
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the commit's flush finds
/// little left to write. Only a hint: durability still comes from
/// [`sync_data`], and a failure here is left for it to report.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on an open descriptor; no memory is passed.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Make `file`'s completed writes durable (`fdatasync`): the commit barrier.
pub fn sync_data(file: &File) -> std::io::Result<()> {
    file.sync_data()?;
    record::note(file, || record::Op::Flush);
    Ok(())
}

/// As [`sync_data`], with the file's metadata too (`fsync`).
pub fn sync_all(file: &File) -> std::io::Result<()> {
    file.sync_all()?;
    record::note(file, || record::Op::Flush);
    Ok(())
}

/// Cut or extend a regular file to `len` bytes (the new bytes read as zeros).
pub fn set_len(file: &File, len: u64) -> std::io::Result<()> {
    file.set_len(len)?;
    record::note(file, || record::Op::SetLen(len));
    Ok(())
}

/// A record of the writes and flushes the tools issue to chosen files, in
/// the order issued: the model of a disk with a volatile write cache that
/// the power-cut tests replay (every prefix of the log, with the writes
/// since each file's last flush kept, dropped or reordered).
///
/// Recording costs one atomic load per write while nothing is recorded.
/// Several recordings may run at once (tests in parallel threads), each on
/// its own files.
pub mod record {
    use std::fs::File;
    use std::os::unix::fs::MetadataExt;
    use std::path::Path;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    /// One thing a file was told to do.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Op {
        Write {
            offset: u64,
            bytes: Vec<u8>,
        },
        /// Everything written to this file before is durable.
        Flush,
        /// The file's size changed (durable, as the writes, at its next flush).
        SetLen(u64),
    }

    /// An [`Op`] on file number `file` (its index in [`Recording::start`]'s list).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Event {
        pub file: usize,
        pub op: Op,
    }

    struct Session {
        id: u64,
        /// (device, inode) of each recorded file.
        files: Vec<(u64, u64)>,
        events: Vec<Event>,
    }

    static SESSIONS: AtomicUsize = AtomicUsize::new(0);
    static STATE: Mutex<(u64, Vec<Session>)> = Mutex::new((0, Vec::new()));

    /// Records the writes to some files until finished or dropped.
    pub struct Recording {
        id: u64,
    }

    impl Recording {
        /// Record every write, flush and size change of `paths` (existing
        /// files) from now on, whoever opens them.
        pub fn start(paths: &[&Path]) -> std::io::Result<Recording> {
            let mut files = Vec::new();
            for p in paths {
                let md = std::fs::metadata(p)?;
                files.push((md.dev(), md.ino()));
            }
            let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
            st.0 += 1;
            let id = st.0;
            st.1.push(Session {
                id,
                files,
                events: Vec::new(),
            });
            SESSIONS.fetch_add(1, Ordering::SeqCst);
            Ok(Recording { id })
        }

        /// Stop and return what was recorded, in order.
        pub fn finish(self) -> Vec<Event> {
            let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
            let i = st.1.iter().position(|s| s.id == self.id);
            i.map(|i| std::mem::take(&mut st.1[i].events))
                .unwrap_or_default()
        }
    }

    impl Drop for Recording {
        fn drop(&mut self) {
            let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
            st.1.retain(|s| s.id != self.id);
            SESSIONS.fetch_sub(1, Ordering::SeqCst);
        }
    }

    pub(super) fn note(file: &File, op: impl FnOnce() -> Op) {
        if SESSIONS.load(Ordering::SeqCst) == 0 {
            return;
        }
        let Ok(md) = file.metadata() else { return };
        let key = (md.dev(), md.ino());
        let mut st = STATE.lock().unwrap_or_else(|e| e.into_inner());
        for s in st.1.iter_mut() {
            if let Some(i) = s.files.iter().position(|&f| f == key) {
                s.events.push(Event { file: i, op: op() });
                return;
            }
        }
    }
}

fn gunzip_to_tempfile(src: &File) -> std::io::Result<File> {
    // Clones share the file position, which the size probe left at the end.
    let mut src = src.try_clone()?;
    src.seek(SeekFrom::Start(0))?;
    let mut reader =
        flate2::read::MultiGzDecoder::new(std::io::BufReader::with_capacity(1 << 20, src));
    let mut tmp = tempfile::tempfile()?;
    std::io::copy(&mut reader, &mut tmp).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("gzip-compressed, and unpacking it failed: {e}"),
        )
    })?;
    Ok(tmp)
}

/// True when `head` (the start of a file) is XML text rather than binary
/// metadata: after an optional byte-order mark and white space it opens a
/// tag (`<?xml`, `<superblock`, `<!--`), and it holds no control byte (NUL
/// bytes may only pad its end). Binary metadata never passes: a superblock
/// has NUL bytes in its header (its version, its zero uuid) and binary
/// data after them.
pub fn looks_like_xml(head: &[u8]) -> bool {
    // Text a block device or a padded file may carry, up to NUL padding.
    let end = head.iter().position(|&b| b == 0).unwrap_or(head.len());
    if head[end..].iter().any(|&b| b != 0) {
        return false;
    }
    let head = &head[..end];
    let text = head.strip_prefix(&[0xef, 0xbb, 0xbf]).unwrap_or(head);
    let start = text.iter().position(|b| !b.is_ascii_whitespace());
    let Some(start) = start else { return false };
    let opens_tag = text[start] == b'<'
        && text
            .get(start + 1)
            .is_some_and(|&c| c == b'?' || c == b'!' || c.is_ascii_alphabetic());
    opens_tag
        && text
            .iter()
            .all(|&b| b >= 0x20 || b == b'\t' || b == b'\n' || b == b'\r')
}

/// True when `a` and `b` are the same file or device: the same inode, or
/// two device nodes for one block device (`/dev/mapper/x` and `/dev/dm-3`).
pub fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => {
            (x.dev() == y.dev() && x.ino() == y.ino())
                || (x.file_type().is_block_device()
                    && y.file_type().is_block_device()
                    && x.rdev() == y.rdev())
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gzip_is_told_apart_from_metadata_by_header_and_checksum() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&[0u8; BLOCK_SIZE]).unwrap();
        let gz = gz.finish().unwrap();
        assert!(is_gzip(&gz));
        // The magic with another method byte (a damaged superblock whose
        // checksum starts 1f 8b, as a fuzzer wrote) is metadata.
        let mut blk = vec![0u8; BLOCK_SIZE];
        blk[..4].copy_from_slice(&[0x1f, 0x8b, 0xf6, 0x74]);
        assert!(!is_gzip(&blk));
        blk[2] = 0x08;
        blk[3] = 0;
        assert!(is_gzip(&blk));
        // A superblock whose valid checksum happens to read 1f 8b 08 00
        // (once in 2^27 pools) is metadata: forge one by choosing bytes
        // 4..8 so the sealed checksum comes out so.
        let sb = forge_superblock_with_checksum([0x1f, 0x8b, 0x08, 0x00]);
        assert_eq!(sb[..4], [0x1f, 0x8b, 0x08, 0x00]);
        assert!(crate::pdata::checksum::identify(&sb).is_some());
        assert!(!is_gzip(&sb));
        assert!(!is_gzip(&gz[..3]));
    }

    /// A block that seals (as a thin superblock) to checksum bytes `want`:
    /// the CRC is affine in the data, so bytes 4..8 are solved for over GF(2).
    fn forge_superblock_with_checksum(want: [u8; 4]) -> Vec<u8> {
        use crate::pdata::checksum::{seal, BlockKind};
        let sealed_with = |x: u32| {
            let mut b = vec![0u8; BLOCK_SIZE];
            b[4..8].copy_from_slice(&x.to_le_bytes());
            seal(&mut b, BlockKind::ThinSuperblock);
            (u32::from_le_bytes(b[..4].try_into().unwrap()), b)
        };
        let c = sealed_with(0).0;
        // rows: (effect of bit i on the checksum, which input bits make it)
        let mut rows: Vec<(u32, u32)> = (0..32)
            .map(|i| (sealed_with(1 << i).0 ^ c, 1 << i))
            .collect();
        let mut target = u32::from_le_bytes(want) ^ c;
        let mut x = 0u32;
        for bit in (0..32).rev() {
            let Some(p) = (0..rows.len()).find(|&r| rows[r].0 >> bit & 1 == 1) else {
                continue;
            };
            let pivot = rows.swap_remove(p);
            for r in rows.iter_mut().filter(|r| r.0 >> bit & 1 == 1) {
                r.0 ^= pivot.0;
                r.1 ^= pivot.1;
            }
            if target >> bit & 1 == 1 {
                target ^= pivot.0;
                x ^= pivot.1;
            }
        }
        assert_eq!(target, 0, "the CRC's 32 bits are reachable");
        sealed_with(x).1
    }

    fn image(nr: u64) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for b in 0..nr {
            let mut blk = vec![0u8; BLOCK_SIZE];
            blk[0..8].copy_from_slice(&b.to_le_bytes());
            f.write_all(&blk).unwrap();
        }
        f.flush().unwrap();
        f
    }

    #[test]
    fn read_in_order_returns_blocks_in_request_order() {
        let f = image(64);
        let dev = BlockDevice::open(f.path(), OpenMode::ReadOnly).unwrap();
        let want = [9u64, 3, 4, 5, 63, 3, 10, 0];
        let mut got = Vec::new();
        dev.read_in_order(&want, 3, |i, b, data| {
            let data = data?;
            assert_eq!(want[i], b);
            got.push(u64::from_le_bytes(data[0..8].try_into().unwrap()));
            Ok::<(), Error>(())
        })
        .unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn out_of_bounds_is_reported_per_block() {
        let f = image(4);
        let dev = BlockDevice::open(f.path(), OpenMode::ReadOnly).unwrap();
        let mut errs = Vec::new();
        dev.read_in_order(&[1, 7, 2], 8, |_, b, data| {
            if data.is_err() {
                errs.push(b);
            }
            Ok::<(), Error>(())
        })
        .unwrap();
        assert_eq!(errs, vec![7]);
    }

    #[test]
    fn small_and_missing_files_are_refused() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&[0u8; 100]).unwrap();
        assert!(matches!(
            BlockDevice::open(f.path(), OpenMode::ReadOnly),
            Err(OpenError::TooSmall(100))
        ));
        assert!(matches!(
            BlockDevice::open(Path::new("/nonexistent/x"), OpenMode::ReadOnly),
            Err(OpenError::NotFound)
        ));
        assert!(matches!(
            BlockDevice::open(Path::new("/"), OpenMode::ReadOnly),
            Err(OpenError::IsDirectory)
        ));
    }

    #[test]
    fn recording_sees_writes_flushes_and_sizes_of_its_files_only() {
        let f = image(4);
        let other = image(4);
        let rec = record::Recording::start(&[f.path()]).unwrap();
        let dev = BlockDevice::open(f.path(), OpenMode::ReadWriteExclusive).unwrap();
        let dev2 = BlockDevice::open(other.path(), OpenMode::ReadWriteExclusive).unwrap();
        let blk = vec![5u8; BLOCK_SIZE];
        dev.write_block(2, &blk).unwrap();
        dev2.write_block(1, &blk).unwrap();
        dev.sync().unwrap();
        set_len(
            &std::fs::OpenOptions::new()
                .write(true)
                .open(f.path())
                .unwrap(),
            5 * 4096,
        )
        .unwrap();
        let ev = rec.finish();
        assert_eq!(
            ev,
            vec![
                record::Event {
                    file: 0,
                    op: record::Op::Write {
                        offset: 2 * 4096,
                        bytes: blk
                    }
                },
                record::Event {
                    file: 0,
                    op: record::Op::Flush
                },
                record::Event {
                    file: 0,
                    op: record::Op::SetLen(5 * 4096)
                },
            ]
        );
    }

    #[test]
    fn gzip_images_are_unpacked() {
        let raw = image(3);
        let data = std::fs::read(raw.path()).unwrap();
        let mut gz = tempfile::NamedTempFile::new().unwrap();
        let mut enc = flate2::write::GzEncoder::new(&mut gz, flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        enc.finish().unwrap();
        let dev = BlockDevice::open(gz.path(), OpenMode::ReadOnly).unwrap();
        assert_eq!(dev.nr_blocks(), 3);
        let mut b = vec![0u8; BLOCK_SIZE];
        dev.read_block(2, &mut b).unwrap();
        assert_eq!(b[0], 2);
    }
}
