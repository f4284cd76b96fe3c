//! Where new metadata blocks come from and go to.
//!
//! A [`BlockWriter`] hands out blocks that hold nothing the current on-disk
//! metadata still needs (block 0 and every block of an `avoid` set are never
//! given out, and a block is never given out twice), keeps the metadata
//! reference counts of what it wrote, and writes blocks in batches of
//! consecutive runs. It never writes block 0: the superblock is the commit
//! point and is written by the commit, after a flush of everything else.
//!
//! Without a device it is a dry run: it allocates and counts, so a writer can
//! learn exactly how many blocks a job needs before touching anything.

use fixedbitset::FixedBitSet;

use crate::pdata::counts::RefCounts;
use crate::pdata::io::BlockDevice;
use crate::pdata::{Error, Result, BLOCK_SIZE};

/// Blocks written in one `pwrite` at most.
const RUN_BLOCKS: usize = 256;

pub struct BlockWriter<'d> {
    dev: Option<&'d BlockDevice>,
    /// Blocks the allocator may hand out: `1 .. nr_blocks`.
    nr_blocks: u64,
    next: u64,
    avoid: Option<FixedBitSet>,
    nr_allocated: u64,
    counts: RefCounts,
    run: Vec<u8>,
    run_first: u64,
}

impl<'d> BlockWriter<'d> {
    /// A writer onto `dev`, whose metadata area is `nr_blocks` blocks.
    pub fn new(dev: &'d BlockDevice, nr_blocks: u64, avoid: Option<FixedBitSet>) -> Self {
        Self::make(Some(dev), nr_blocks, avoid)
    }

    /// A writer onto `dev` that adds to existing metadata counts (blocks
    /// with a count are never handed out, nor blocks in `avoid`).
    pub fn with_counts(dev: &'d BlockDevice, counts: RefCounts, avoid: FixedBitSet) -> Self {
        let mut avoid = avoid;
        avoid.grow(counts.nr_blocks() as usize);
        for b in 0..counts.nr_blocks() {
            if counts.get(b) > 0 {
                avoid.insert(b as usize);
            }
        }
        let mut w = Self::make(Some(dev), counts.nr_blocks(), Some(avoid));
        w.counts = counts;
        w
    }

    /// A writer that writes nothing and may allocate past `nr_blocks`.
    pub fn dry_run(nr_blocks: u64, avoid: Option<FixedBitSet>) -> Self {
        // Beside an `avoid` set the blocks run past `nr_blocks`. Their
        // counts are kept too (as many more as it holds: enough for any job
        // that fits the device packed), or the space map of a packed layout
        // would be measured short of the ref-count entries of those blocks.
        let beyond = avoid.as_ref().map_or(0, |a| a.count_ones(..) as u64);
        let mut w = Self::make(None, nr_blocks, avoid);
        w.counts = RefCounts::new(nr_blocks + beyond);
        w
    }

    fn make(dev: Option<&'d BlockDevice>, nr_blocks: u64, avoid: Option<FixedBitSet>) -> Self {
        BlockWriter {
            dev,
            nr_blocks,
            next: 1,
            avoid,
            nr_allocated: 0,
            counts: RefCounts::new(nr_blocks),
            run: Vec::with_capacity(RUN_BLOCKS * BLOCK_SIZE),
            run_first: 0,
        }
    }

    /// True for a writer that only measures (see [`BlockWriter::dry_run`]).
    pub fn is_dry_run(&self) -> bool {
        self.dev.is_none()
    }

    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    /// Blocks handed out so far (block 0 not included).
    pub fn nr_allocated(&self) -> u64 {
        self.nr_allocated
    }

    /// One past the highest block handed out: the device size a dry run
    /// needs (a dry run may allocate past `nr_blocks` to measure it).
    pub fn high_water(&self) -> u64 {
        self.next
    }

    /// A fresh block, with a reference count of 0 until something refers to it.
    pub fn alloc(&mut self) -> Result<u64> {
        loop {
            let b = self.next;
            if b >= self.nr_blocks && self.dev.is_some() {
                return Err(Error::Other(format!(
                    "metadata device full: all {} blocks in use",
                    self.nr_blocks
                )));
            }
            self.next += 1;
            if self.avoid.as_ref().is_some_and(|a| a.contains(b as usize)) {
                continue;
            }
            self.nr_allocated += 1;
            return Ok(b);
        }
    }

    /// One more reference to metadata block `b`.
    pub fn inc(&mut self, b: u64) {
        self.counts.inc(b);
    }

    pub fn counts(&self) -> &RefCounts {
        &self.counts
    }

    pub fn counts_mut(&mut self) -> &mut RefCounts {
        &mut self.counts
    }

    /// Queue a sealed block for writing. Blocks are written in runs of
    /// consecutive numbers; the writer flushes a run when the next block
    /// does not follow it.
    pub fn write(&mut self, b: u64, block: &[u8]) -> Result<()> {
        debug_assert_eq!(block.len(), BLOCK_SIZE);
        debug_assert_ne!(b, 0, "the superblock is written by the commit");
        let Some(_) = self.dev else {
            return Ok(());
        };
        let len = (self.run.len() / BLOCK_SIZE) as u64;
        if len > 0 && (b != self.run_first + len || len as usize == RUN_BLOCKS) {
            self.flush_run()?;
        }
        if self.run.is_empty() {
            self.run_first = b;
        }
        self.run.extend_from_slice(block);
        Ok(())
    }

    fn flush_run(&mut self) -> Result<()> {
        if let Some(dev) = self.dev {
            if !self.run.is_empty() {
                dev.write_run(self.run_first, &self.run)?;
            }
        }
        self.run.clear();
        Ok(())
    }

    /// The commit: write everything queued, flush it, then write `block0`
    /// (the superblock that makes it current) and flush again. A crash
    /// before the second flush leaves the previous superblock in charge.
    pub fn commit(&mut self, block0: &[u8]) -> Result<()> {
        self.flush()?;
        if let Some(dev) = self.dev {
            dev.write_block(0, block0)?;
            dev.sync()?;
        }
        Ok(())
    }

    /// Write everything queued and flush it to stable storage: after this,
    /// a superblock may point at what was written.
    pub fn flush(&mut self) -> Result<()> {
        self.flush_run()?;
        if let Some(dev) = self.dev {
            dev.sync()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_skips_the_superblock_and_avoided_blocks() {
        let mut avoid = FixedBitSet::with_capacity(8);
        avoid.insert(2);
        avoid.insert(3);
        let mut w = BlockWriter::dry_run(6, Some(avoid));
        let got: Vec<u64> = (0..4).map(|_| w.alloc().unwrap()).collect();
        assert_eq!(got, vec![1, 4, 5, 6]);
        assert_eq!(w.nr_allocated(), 4);
        assert_eq!(w.high_water(), 7, "a dry run measures past the end");
    }
}
