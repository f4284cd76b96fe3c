//! Writing space maps from reference counts held in memory.
//!
//! Bitmaps are laid out as the kernel lays them out, including its quirk for
//! the last, partial bitmap: entries past the end of the device count as free
//! in `nr_free` (the kernel's `sm_ll_extend` creates every bitmap with all
//! 16320 entries free).

use crate::pdata::btree::TreeBuilder;
use crate::pdata::checksum::{seal, BlockKind};
use crate::pdata::counts::RefCounts;
use crate::pdata::writer::BlockWriter;
use crate::pdata::{Error, Result, BLOCK_SIZE};

use super::{SmRoot, ENTRIES_PER_BITMAP, INDEX_HEADER, MAX_METADATA_BITMAPS};

const WORDS_PER_BITMAP: usize = ENTRIES_PER_BITMAP as usize / 32;

impl SmRoot {
    /// The 32 bytes of `disk_sm_root`.
    pub fn encode(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.nr_blocks.to_le_bytes());
        out[8..16].copy_from_slice(&self.nr_allocated.to_le_bytes());
        out[16..24].copy_from_slice(&self.bitmap_root.to_le_bytes());
        out[24..32].copy_from_slice(&self.ref_count_root.to_le_bytes());
    }
}

/// In-memory counts (2 bits a block, low bit first) to the on-disk order
/// (the even bit of each pair is the high bit): swap the bits of every pair.
#[inline]
fn disk_word(mem: u64) -> u64 {
    const LO: u64 = 0x5555_5555_5555_5555;
    ((mem & LO) << 1) | ((mem >> 1) & LO)
}

/// Fill `block` as bitmap `index` of `counts` at location `loc`, and return
/// its index entry values (nr_free, none_free_before).
fn fill_bitmap(block: &mut [u8], loc: u64, counts: &RefCounts, index: u64) -> (u32, u32) {
    block.fill(0);
    block[8..16].copy_from_slice(&loc.to_le_bytes());
    let base = index as usize * WORDS_PER_BITMAP;
    let mut used = 0u32;
    let mut first_free = None;
    for j in 0..WORDS_PER_BITMAP {
        let m = counts.word(base + j);
        let nonzero = (m | (m >> 1)) & 0x5555_5555_5555_5555;
        used += nonzero.count_ones();
        if first_free.is_none() && nonzero != 0x5555_5555_5555_5555 {
            let k = (!nonzero & 0x5555_5555_5555_5555).trailing_zeros() / 2;
            first_free = Some(j as u32 * 32 + k);
        }
        let off = 16 + 8 * j;
        block[off..off + 8].copy_from_slice(&disk_word(m).to_le_bytes());
    }
    seal(block, BlockKind::Bitmap);
    (
        ENTRIES_PER_BITMAP as u32 - used,
        first_free.unwrap_or(ENTRIES_PER_BITMAP as u32),
    )
}

fn index_value(loc: u64, nr_free: u32, none_free_before: u32) -> [u8; 16] {
    let mut v = [0u8; 16];
    v[0..8].copy_from_slice(&loc.to_le_bytes());
    v[8..12].copy_from_slice(&nr_free.to_le_bytes());
    v[12..16].copy_from_slice(&none_free_before.to_le_bytes());
    v
}

/// The ref-count tree: block -> u32 count, for counts of 3 or more.
fn write_ref_count_tree(
    w: &mut BlockWriter,
    overflow: impl Iterator<Item = (u64, u32)>,
) -> Result<u64> {
    let mut t = TreeBuilder::new(4);
    for (b, c) in overflow {
        t.push_array(w, b, &c.to_le_bytes())?;
    }
    t.finish(w)
}

/// Write the data space map of `counts` (one entry a data block).
pub fn write_data_sm(w: &mut BlockWriter, counts: &RefCounts) -> Result<SmRoot> {
    let nr_blocks = counts.nr_blocks();
    let mut index = TreeBuilder::new(16);
    let mut block = vec![0u8; BLOCK_SIZE];
    // A dry run measures the space needed: what the blocks would hold does
    // not matter to it (3 in 4 of a big pool's blocks may be shared 3 ways
    // or more: millions of ref-count entries not worth making twice).
    let dry = w.is_dry_run();
    for i in 0..nr_blocks.div_ceil(ENTRIES_PER_BITMAP) {
        let loc = w.alloc()?;
        let (nr_free, nfb) = if dry {
            (0, 0)
        } else {
            fill_bitmap(&mut block, loc, counts, i)
        };
        w.write(loc, &block)?;
        w.inc(loc);
        index.push(w, i, &index_value(loc, nr_free, nfb))?;
    }
    let bitmap_root = index.finish(w)?;
    let ref_count_root = if dry {
        let mut t = TreeBuilder::new(4);
        t.push_dry(w, counts.nr_overflow())?;
        t.finish(w)?
    } else {
        write_ref_count_tree(w, counts.overflow_iter())?
    };
    Ok(SmRoot {
        nr_blocks,
        nr_allocated: counts.nr_allocated(),
        bitmap_root,
        ref_count_root,
    })
}

/// Write the metadata space map of everything `w` has counted, and of the
/// space map's own blocks. Call it last: every other metadata block, block 0
/// included, must already be counted.
pub fn write_metadata_sm(w: &mut BlockWriter) -> Result<SmRoot> {
    let nr_blocks = w.nr_blocks();
    let nr_bitmaps = nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
    if nr_bitmaps > MAX_METADATA_BITMAPS {
        return Err(Error::Other(format!(
            "metadata space map of {nr_blocks} blocks needs {nr_bitmaps} bitmaps (at most {MAX_METADATA_BITMAPS})"
        )));
    }
    // The ref-count tree's own nodes have count 1, so its content is known
    // before it is written; likewise the bitmaps and index block.
    let overflow = w.counts().overflow_sorted();
    let ref_count_root = write_ref_count_tree(w, overflow.into_iter())?;
    let mut locs = Vec::with_capacity(nr_bitmaps);
    for _ in 0..nr_bitmaps {
        let b = w.alloc()?;
        w.inc(b);
        locs.push(b);
    }
    let index_loc = w.alloc()?;
    w.inc(index_loc);

    let mut index = vec![0u8; BLOCK_SIZE];
    index[8..16].copy_from_slice(&index_loc.to_le_bytes());
    let mut block = vec![0u8; BLOCK_SIZE];
    for (i, &loc) in locs.iter().enumerate() {
        let (nr_free, nfb) = fill_bitmap(&mut block, loc, w.counts(), i as u64);
        w.write(loc, &block)?;
        let off = INDEX_HEADER + 16 * i;
        index[off..off + 16].copy_from_slice(&index_value(loc, nr_free, nfb));
    }
    seal(&mut index, BlockKind::MetadataIndex);
    w.write(index_loc, &index)?;
    Ok(SmRoot {
        nr_blocks,
        nr_allocated: w.counts().nr_allocated(),
        bitmap_root: index_loc,
        ref_count_root,
    })
}
