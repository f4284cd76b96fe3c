//! thin_trim: discard the data blocks of an inactive pool that no thin
//! device (nor the metadata snapshot) uses.
//!
//! A data block is discarded only when both the data space map on disk and
//! the counts recomputed from the trees (live and metadata snapshot) say it
//! is free, and only after the metadata passes a full check: a discard based
//! on a wrong space map destroys data. Leaked blocks (counted on disk, used
//! by no tree) are left alone. Free blocks are merged into runs, each
//! discarded with one request: `BLKDISCARD` on a block device, a punched
//! hole (`fallocate` PUNCH_HOLE | KEEP_SIZE) in a regular file. The
//! metadata is only read.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

use crate::pdata::btree::Walker;
use crate::pdata::io::BlockDevice;
use crate::pdata::space_map::DiskSpaceMap;
use crate::thin::check::{check, CheckOptions, Severity};
use crate::thin::merge::MergeError;
use crate::thin::superblock::{read_superblock, SUPERBLOCK_LOCATION};
use crate::thin::Error;

/// What to discard: runs of free data blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrimPlan {
    /// Bytes per data block.
    pub data_block_bytes: u64,
    pub nr_data_blocks: u64,
    /// (first data block, number of blocks), in block order, maximal.
    pub runs: Vec<(u64, u64)>,
    /// Blocks in the runs.
    pub free_blocks: u64,
    /// Blocks the space map counts but no tree uses (left alone).
    pub leaked_blocks: u64,
}

/// Check the metadata on `meta` and find its free data blocks.
/// `progress(done, total)` follows the check's reading of the mappings.
pub fn plan_trim(
    meta: &BlockDevice,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<TrimPlan, MergeError> {
    let sb =
        read_superblock(meta, SUPERBLOCK_LOCATION).map_err(|e| Error::metadata("superblock", e))?;
    if sb.needs_check() {
        return Err(MergeError::NeedsCheck);
    }
    let opts = CheckOptions {
        keep_counts: true,
        ..Default::default()
    };
    let report = check(meta, &opts, progress);
    if let Some(f) = report
        .findings
        .iter()
        .find(|f| f.severity == Severity::Fatal)
    {
        return Err(MergeError::Unsound(format!(
            "the metadata does not pass thin_check ({}: {}); nothing was discarded (run thin_check and thin_repair first)",
            f.area, f.message
        )));
    }
    let Some(counts) = report.counts else {
        return Err(MergeError::Unsound(
            "the check could not count the data blocks in use; nothing was discarded".into(),
        ));
    };
    let mut walker = Walker::new(meta);
    let (disk, errors) = DiskSpaceMap::load_data(&mut walker, sb.data_sm());
    if let Some(e) = errors.into_iter().next() {
        return Err(Error::metadata("data space map", e).into());
    }
    let on_disk = disk
        .to_counts(meta)
        .map_err(|e| Error::metadata("data space map", e))?;
    let nr = sb.data_sm().nr_blocks;
    if counts.data.nr_blocks() != nr || on_disk.nr_blocks() != nr {
        return Err(MergeError::Unsound(format!(
            "the data space map's size ({} blocks) and the recomputed counts' ({}) differ; nothing was discarded",
            on_disk.nr_blocks(),
            counts.data.nr_blocks()
        )));
    }
    let mut plan = TrimPlan {
        data_block_bytes: sb.data_block_size as u64 * 512,
        nr_data_blocks: nr,
        ..Default::default()
    };
    for b in 0..nr {
        let used_by_trees = counts.data.get(b) > 0;
        let counted = on_disk.get(b) > 0;
        if counted && !used_by_trees {
            plan.leaked_blocks += 1;
        }
        if used_by_trees || counted {
            continue;
        }
        plan.free_blocks += 1;
        match plan.runs.last_mut() {
            Some((first, len)) if *first + *len == b => *len += 1,
            _ => plan.runs.push((b, 1)),
        }
    }
    Ok(plan)
}

/// Discard every run of `plan` on the data device `data` (a block device
/// when `is_block_device`, else a regular file). `progress(blocks done,
/// blocks total)`.
pub fn discard_runs(
    data: &File,
    is_block_device: bool,
    plan: &TrimPlan,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), MergeError> {
    let bb = plan.data_block_bytes;
    let mut done = 0u64;
    progress(0, plan.free_blocks);
    for &(first, len) in &plan.runs {
        let (off, bytes) = (first * bb, len * bb);
        let r = if is_block_device {
            blk_discard(data, off, bytes)
        } else {
            punch_hole(data, off, bytes)
        };
        r.map_err(|e| {
            MergeError::io(
                format!(
                    "discarding data blocks {first}..{} (bytes {off}..{})",
                    first + len - 1,
                    off + bytes
                ),
                e,
            )
        })?;
        done += len;
        progress(done, plan.free_blocks);
    }
    if !is_block_device {
        data.sync_all()
            .map_err(|e| MergeError::io("flushing the data file", e))?;
    }
    Ok(())
}

/// `BLKDISCARD`: `_IO(0x12, 119)`, argument `u64 [offset, length]`.
const BLKDISCARD: libc::c_ulong = 0x1277;

fn blk_discard(f: &File, off: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [off, len];
    // SAFETY: BLKDISCARD reads two u64s from the pointer, which points at
    // `range`, alive for the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<()> {
    let o = libc::off_t::try_from(off).map_err(|_| io::Error::other("offset too large"))?;
    let l = libc::off_t::try_from(len).map_err(|_| io::Error::other("length too large"))?;
    // SAFETY: fallocate on an open descriptor; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
