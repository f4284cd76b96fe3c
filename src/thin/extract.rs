//! thin_extract: a thin device's content, read offline from the pool's
//! metadata and data device, written to a file or a stream.
//!
//! The content is what the kernel's thin target reads: block `v` is data
//! block `d` of the data device where the device maps `v -> d`; elsewhere it
//! is the external origin's bytes (zeros past the origin's end), or zeros
//! when there is no external origin. The device's size is not in the
//! metadata (it is in the thin target's table): it is given, or taken as
//! the end of the highest mapped block, or the origin's size if larger.
//!
//! A regular output file is cut to the size and written only where the
//! content is not zero, so unmapped blocks (without an origin) and zero
//! blocks are holes. A block device gets zeros by `fallocate` (punch hole,
//! which zeroes on block devices) or, where that fails, by writing them; a
//! stream gets every byte.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use crate::pdata::io::BlockDevice;
use crate::thin::dump::select_superblock;
use crate::thin::merge::{device_extents, find_device, Gather, MergeError, Sink, IO_BYTES};
use crate::thin::superblock::{read_superblock, SUPERBLOCK_LOCATION};
use crate::thin::Error;

#[derive(Debug, Clone, Default)]
pub struct ExtractOptions {
    /// None: the live metadata. Some(None): the held metadata snapshot.
    /// Some(Some(b)): a metadata snapshot superblock at block b.
    pub metadata_snap: Option<Option<u64>>,
    pub dev_id: u64,
    /// The device's size in bytes (else: computed, see the module docs).
    pub size: Option<u64>,
    /// The source is the live thin device itself (thin_migrate): mapped
    /// bytes are read at their virtual offset, not at their data block.
    pub mapped_at_virtual: bool,
    /// The largest read or write (default [`IO_BYTES`]).
    pub io_bytes: Option<usize>,
}

/// Where the content goes.
pub enum Output<'a> {
    /// A regular file (cut to the size; holes where zero).
    File(&'a File),
    /// A block device (at least the size; zeros punched or written).
    BlockDevice(&'a File),
    /// A stream (every byte, in order).
    Stream(&'a mut dyn Write),
}

/// A read-only source file and its name for messages.
pub struct Source<'a> {
    pub file: &'a File,
    pub name: &'a str,
    pub size: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractStats {
    /// The size written, bytes.
    pub size: u64,
    pub data_block_bytes: u64,
    /// Mapped blocks inside the size.
    pub mapped_blocks: u64,
    /// Mapped blocks at or past the size (left out).
    pub beyond_blocks: u64,
    /// One past the highest mapped virtual block.
    pub end_block: u64,
    /// Bytes taken from the data device, from the origin, and zeros.
    pub data_bytes: u64,
    pub origin_bytes: u64,
    pub zero_bytes: u64,
}

/// The device's size when not given: (highest mapped block + 1) * block
/// size, or the origin's size if larger.
pub fn default_size(end_block: u64, block_bytes: u64, origin_size: Option<u64>) -> u64 {
    end_block
        .saturating_mul(block_bytes)
        .max(origin_size.unwrap_or(0))
}

/// Write thin device `opts.dev_id`'s content to `out`. `progress` gets
/// (bytes done, size).
pub fn extract(
    meta: &BlockDevice,
    opts: &ExtractOptions,
    data: &Source,
    origin: Option<&Source>,
    out: Output,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExtractStats, MergeError> {
    let live =
        read_superblock(meta, SUPERBLOCK_LOCATION).map_err(|e| Error::metadata("superblock", e))?;
    let sb = select_superblock(meta, opts.metadata_snap)?;
    let dev = find_device(meta, &sb, opts.dev_id, opts.metadata_snap.is_some())?;
    let bb = sb.data_block_size as u64 * 512;
    let nr_data = live.data_sm().nr_blocks;

    // First pass, metadata only: the highest mapped block, and the mappings
    // checked against the pool and the data device.
    let mut end_block = 0u64;
    device_extents(meta, dev.root, dev.id, &mut |e| {
        let end = e.data + e.len;
        if end > nr_data || (!opts.mapped_at_virtual && end.saturating_mul(bb) > data.size) {
            let what = if end > nr_data {
                format!("the pool's {nr_data} data blocks")
            } else {
                format!("the end of {} ({} bytes)", data.name, data.size)
            };
            return Err(MergeError::Thin(Error::Inconsistent(format!(
                "device {} maps virtual block {} to data block {}, beyond {what}",
                dev.id,
                e.vblock,
                end - 1
            ))));
        }
        end_block = e.vblock + e.len;
        Ok(())
    })?;
    let size = opts
        .size
        .unwrap_or_else(|| default_size(end_block, bb, origin.map(|o| o.size)));
    let mut stats = ExtractStats {
        size,
        data_block_bytes: bb,
        end_block,
        ..Default::default()
    };

    let mut out = out;
    // How zeros are made: a regular file already has holes; a block device
    // gets them punched (or written); a stream gets them written, in order.
    let punch_dev: Option<&File> = match &out {
        Output::BlockDevice(f) => Some(*f),
        _ => None,
    };
    let skip_zeros = matches!(out, Output::File(_));
    if let Output::File(f) = &out {
        f.set_len(0)
            .and_then(|_| f.set_len(size))
            .map_err(|e| MergeError::io(format!("setting the output's size to {size} bytes"), e))?;
    }
    let mut streamed = 0u64; // stream: bytes written so far
    progress(0, size);
    let mut sink = |off: u64, bytes: &[u8]| -> Result<(), MergeError> {
        let wr = |e: io::Error| MergeError::io(format!("writing the output at offset {off}"), e);
        match &mut out {
            Output::File(f) => {
                // Zero ranges (4 KiB granules) stay holes.
                for (a, b) in nonzero_ranges(bytes, 4096) {
                    let at = off + a as u64;
                    f.write_all_at(&bytes[a..b], at).map_err(wr)?;
                }
            }
            Output::BlockDevice(f) => f.write_all_at(bytes, off).map_err(wr)?,
            Output::Stream(w) => {
                if off != streamed {
                    return Err(MergeError::io(
                        "writing the output",
                        io::Error::other(format!(
                            "stream out of order: offset {off} after {streamed} bytes"
                        )),
                    ));
                }
                w.write_all(bytes).map_err(wr)?;
                streamed += bytes.len() as u64;
            }
        }
        progress(off + bytes.len() as u64, size);
        Ok(())
    };
    let mut gather = Gather::new(opts.io_bytes.unwrap_or(IO_BYTES));

    // Unmapped bytes [a, b): the origin's, zeros past its end.
    let gap = |a: u64,
               b: u64,
               gather: &mut Gather,
               stats: &mut ExtractStats,
               sink: &mut Sink|
     -> Result<(), MergeError> {
        let mut z = a;
        if let Some(o) = origin {
            let oend = b.min(o.size);
            if a < oend {
                gather.add(o.file, o.name, a, a, oend - a, sink)?;
                stats.origin_bytes += oend - a;
                z = oend;
            }
        }
        if z >= b {
            return Ok(());
        }
        stats.zero_bytes += b - z;
        if skip_zeros {
            return Ok(());
        }
        if let Some(f) = punch_dev {
            gather.flush(sink)?;
            if punch(f, z, b - z) {
                return Ok(());
            }
        }
        gather.add_zeros(z, b - z, sink)
    };

    let mut pos = 0u64; // device bytes done (in order)
    device_extents(meta, dev.root, dev.id, &mut |e| {
        let start = e.vblock.saturating_mul(bb);
        if start >= size {
            stats.beyond_blocks += e.len;
            return Ok(());
        }
        let end = (e.vblock + e.len).saturating_mul(bb).min(size);
        let inside = (end - start).div_ceil(bb);
        stats.mapped_blocks += inside;
        stats.beyond_blocks += e.len - inside;
        gap(pos, start, &mut gather, &mut stats, &mut sink)?;
        let src = if opts.mapped_at_virtual {
            start
        } else {
            e.data * bb
        };
        gather.add(data.file, data.name, src, start, end - start, &mut sink)?;
        stats.data_bytes += end - start;
        pos = end;
        Ok(())
    })?;
    gap(pos, size, &mut gather, &mut stats, &mut sink)?;
    gather.flush(&mut sink)?;
    match out {
        Output::File(f) | Output::BlockDevice(f) => f
            .sync_all()
            .map_err(|e| MergeError::io("flushing the output", e))?,
        Output::Stream(w) => w
            .flush()
            .map_err(|e| MergeError::io("flushing the output", e))?,
    }
    progress(size, size);
    Ok(stats)
}

/// The ranges of `bytes` that are not all zero, in granules of `g` bytes
/// (consecutive non-zero granules joined).
fn nonzero_ranges(bytes: &[u8], g: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, c) in bytes.chunks(g).enumerate() {
        if c.iter().all(|&b| b == 0) {
            continue;
        }
        let (a, b) = (i * g, i * g + c.len());
        match out.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ => out.push((a, b)),
        }
    }
    out
}

/// Zero `len` bytes at `off` of a block device by punching a hole (the
/// kernel zeroes the range); false when the device does not support it.
fn punch(f: &File, off: u64, len: u64) -> bool {
    let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
        return false;
    };
    // SAFETY: fallocate on an open descriptor; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    };
    r == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonzero_ranges_join_granules() {
        let mut b = vec![0u8; 10 * 4096 + 100];
        b[5] = 1;
        b[4096 + 7] = 1;
        b[3 * 4096] = 1;
        b[10 * 4096 + 99] = 1;
        assert_eq!(
            nonzero_ranges(&b, 4096),
            vec![
                (0, 2 * 4096),
                (3 * 4096, 4 * 4096),
                (10 * 4096, 10 * 4096 + 100)
            ]
        );
        assert!(nonzero_ranges(&[0u8; 8192], 4096).is_empty());
    }

    #[test]
    fn the_default_size_covers_the_mappings_and_the_origin() {
        assert_eq!(default_size(10, 65536, None), 655360);
        assert_eq!(default_size(10, 65536, Some(1 << 20)), 1 << 20);
        assert_eq!(default_size(0, 65536, None), 0);
    }
}
