//! Copy-on-write transactions over existing metadata, with the kernel's
//! reference-counting rules and commit order.
//!
//! - Blocks the committed metadata uses are never written: a change to a
//!   node goes to a shadow copy in a fresh block ([`Transaction::shadow`]).
//!   Shadowing a node that has other owners (count > 1) gives its children
//!   (or, for leaves, whatever their values reference) one more reference,
//!   as `dm_tm_shadow_block` + `inc_children` do.
//! - A block freed in this transaction is not handed out again before the
//!   commit (its old contents may still be needed if we crash).
//! - [`Transaction::commit`] writes every new block and fresh space maps,
//!   flushes, and only then writes the superblock: a crash at any point
//!   leaves the old metadata whole.
//!
//! Counts are held in memory (2 bits a block), loaded from the space maps.

use std::collections::BTreeMap;

use fixedbitset::FixedBitSet;

use crate::pdata::btree::{Node, Walker, INTERNAL_NODE, LEAF_NODE};
use crate::pdata::checksum::{seal, BlockKind};
use crate::pdata::counts::RefCounts;
use crate::pdata::io::BlockDevice;
use crate::pdata::space_map::{write_data_sm, write_metadata_sm, DiskSpaceMap, SmRoot};
use crate::pdata::writer::BlockWriter;
use crate::pdata::{le32, le64, Error, Result, BLOCK_SIZE};

/// What the values of a tree's leaves refer to, for reference counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueRefs {
    /// Plain values (device details, space-map entries).
    Nothing,
    /// Thin bottom-level mappings: the high 40 bits are a data block.
    DataBlockTime,
    /// Thin top-level leaves: values are roots of metadata subtrees.
    MetadataRoot,
}

pub struct Transaction<'d> {
    dev: &'d BlockDevice,
    /// Blocks in use when the transaction began: never overwritten.
    committed: FixedBitSet,
    /// Blocks handed out by this transaction (never handed out twice).
    fresh: FixedBitSet,
    meta: RefCounts,
    data: RefCounts,
    /// Data blocks in use when the transaction began: not handed out again
    /// before the commit, even if freed (the old metadata still maps them).
    #[cfg(test)]
    data_committed: FixedBitSet,
    /// New blocks and shadows: (kind, contents), written at commit.
    dirty: BTreeMap<u64, (BlockKind, Box<[u8; BLOCK_SIZE]>)>,
    next: u64,
    /// The old space maps' own blocks: released when new ones are written.
    old_sm_blocks: Vec<u64>,
}

impl<'d> Transaction<'d> {
    /// Begin a transaction over the metadata whose space maps are `data_sm`
    /// and `metadata_sm` (from the superblock). `dev` must be writable.
    pub fn begin(dev: &'d BlockDevice, data_sm: SmRoot, metadata_sm: SmRoot) -> Result<Self> {
        let mut walker = Walker::new(dev).with_ref_counts();
        let (msm, errs) = DiskSpaceMap::load_metadata(&mut walker, metadata_sm);
        if let Some(e) = errs.into_iter().next() {
            return Err(e);
        }
        let (dsm, errs) = DiskSpaceMap::load_data(&mut walker, data_sm);
        if let Some(e) = errs.into_iter().next() {
            return Err(e);
        }
        let sm_blocks = walker.take_ref_counts().expect("counting walker");
        let meta = msm.to_counts(dev)?;
        let data = dsm.to_counts(dev)?;
        if meta.nr_blocks() > dev.nr_blocks() {
            return Err(Error::Other(format!(
                "the metadata space map describes {} blocks but the device has {}",
                meta.nr_blocks(),
                dev.nr_blocks()
            )));
        }
        let nr = meta.nr_blocks();
        let mut committed = FixedBitSet::with_capacity(nr as usize);
        let mut old_sm_blocks = Vec::new();
        for b in 0..nr {
            if meta.get(b) > 0 {
                committed.insert(b as usize);
            }
            if sm_blocks.get(b) > 0 {
                old_sm_blocks.push(b);
            }
        }
        #[cfg(test)]
        let mut data_committed = FixedBitSet::with_capacity(data.nr_blocks() as usize);
        #[cfg(test)]
        for b in 0..data.nr_blocks() {
            if data.get(b) > 0 {
                data_committed.insert(b as usize);
            }
        }
        Ok(Transaction {
            dev,
            #[cfg(test)]
            data_committed,
            fresh: FixedBitSet::with_capacity(nr as usize),
            committed,
            meta,
            data,
            dirty: BTreeMap::new(),
            next: 1,
            old_sm_blocks,
        })
    }

    pub fn device(&self) -> &'d BlockDevice {
        self.dev
    }

    pub fn meta_count(&self, b: u64) -> u32 {
        self.meta.get(b)
    }
    pub fn data_count(&self, b: u64) -> u32 {
        self.data.get(b)
    }
    pub fn inc(&mut self, b: u64) {
        self.meta.inc(b);
    }
    /// One reference fewer to metadata block `b`; returns the new count.
    /// A block the space map counts as free is damage (the kernel fails
    /// the operation too): an error, never a silent zero.
    pub fn dec(&mut self, b: u64) -> Result<u32> {
        match self.meta.dec(b) {
            0 => Err(Error::invalid(
                b,
                "reference count below zero (the space map calls it free)",
            )),
            old => Ok(old - 1),
        }
    }
    pub fn data_inc(&mut self, b: u64) {
        self.data.inc(b);
    }
    /// One reference fewer to data block `b`; returns the new count (an
    /// error for a block the data space map counts as free).
    pub fn data_dec(&mut self, b: u64) -> Result<u32> {
        match self.data.dec(b) {
            0 => Err(Error::Other(format!(
                "data block {b}: reference count below zero (the data space map calls it free)"
            ))),
            old => Ok(old - 1),
        }
    }

    /// A free data block (count 0), searching from `hint`; not counted yet.
    #[cfg(test)]
    pub fn find_free_data(&self, hint: u64) -> Option<u64> {
        let n = self.data.nr_blocks();
        (hint..n)
            .chain(0..hint.min(n))
            .find(|&b| self.data.get(b) == 0 && !self.data_committed.contains(b as usize))
    }

    /// A fresh metadata block with count 1, zeroed, to be written at commit as `kind`.
    pub fn alloc(&mut self, kind: BlockKind) -> Result<u64> {
        let nr = self.fresh.len() as u64;
        while self.next < nr {
            let b = self.next;
            self.next += 1;
            let i = b as usize;
            if self.committed.contains(i) || self.fresh.contains(i) || self.meta.get(b) > 0 {
                continue;
            }
            self.fresh.insert(i);
            self.meta.set(b, 1);
            let mut data = Box::new([0u8; BLOCK_SIZE]);
            data[8..16].copy_from_slice(&b.to_le_bytes());
            self.dirty.insert(b, (kind, data));
            return Ok(b);
        }
        Err(Error::Other(format!(
            "metadata device full: no free block among {nr}"
        )))
    }

    /// The current contents of block `b` (this transaction's copy if any).
    pub fn read(&self, b: u64) -> Result<Vec<u8>> {
        if let Some((kind, d)) = self.dirty.get(&b) {
            // Sealed, so it validates like a block read from the device.
            let mut copy = d.to_vec();
            seal(&mut copy, *kind);
            return Ok(copy);
        }
        let mut buf = vec![0u8; BLOCK_SIZE];
        self.dev.read_block(b, &mut buf)?;
        Ok(buf)
    }

    /// Contents of a block this transaction allocated (writable).
    pub fn block_mut(&mut self, b: u64) -> Result<&mut [u8; BLOCK_SIZE]> {
        match self.dirty.get_mut(&b) {
            Some((_, d)) => Ok(d),
            None => Err(Error::Other(format!(
                "block {b} is not writable in this transaction (shadow it first)"
            ))),
        }
    }

    /// True when `b` was allocated by this transaction (changes go in place).
    pub fn is_fresh(&self, b: u64) -> bool {
        self.dirty.contains_key(&b)
    }

    /// Give up one reference to the tree at `root`; when that was the last,
    /// free its nodes, recursively, and release what its leaves reference
    /// (the kernel's `dm_btree_del`). `levels` says what each level's leaves
    /// hold, top first: a thin mapping tree is `[MetadataRoot, DataBlockTime]`.
    pub fn del_tree(&mut self, root: u64, levels: &[ValueRefs]) -> Result<()> {
        if self.meta.get(root) == 0 {
            return Err(Error::invalid(root, "deleting a tree whose root is free"));
        }
        if self.dec(root)? > 0 {
            return Ok(());
        }
        let data = self.read(root)?;
        let vs = le32(&data, 24) as usize;
        let node = Node::parse(root, &data, vs)?;
        let flags = le32(&data, 4);
        debug_assert!(flags == INTERNAL_NODE || flags == LEAF_NODE);
        let counted =
            !node.is_leaf() || matches!(levels.first(), Some(r) if *r != ValueRefs::Nothing);
        if !counted {
            return Ok(());
        }
        if vs != 8 {
            return Err(Error::invalid(
                root,
                format!("value size {vs} where references are counted"),
            ));
        }
        for i in 0..node.nr_entries() {
            let v = le64(node.value_bytes(i), 0);
            if !node.is_leaf() {
                self.del_tree(v, levels)?;
                continue;
            }
            match levels.first() {
                Some(ValueRefs::DataBlockTime) => {
                    self.data_dec(v >> 24)?;
                }
                Some(ValueRefs::MetadataRoot) => self.del_tree(v, &levels[1..])?,
                _ => {}
            }
        }
        Ok(())
    }

    /// Commit: write the new and shadowed blocks and fresh space maps, flush,
    /// then write block 0 as `superblock(data sm root, metadata sm root)`
    /// returns it (sealed), and flush.
    pub fn commit<F>(mut self, superblock: F) -> Result<()>
    where
        F: FnOnce(&SmRoot, &SmRoot) -> Vec<u8>,
    {
        // The old space maps' blocks are released; new ones are written.
        for b in std::mem::take(&mut self.old_sm_blocks) {
            self.meta.dec(b);
        }
        let mut avoid = self.committed.clone();
        avoid.union_with(&self.fresh);
        let mut w = BlockWriter::with_counts(self.dev, self.meta.clone(), avoid);
        for (b, (kind, data)) in self.dirty.iter_mut() {
            if *b == 0 {
                return Err(Error::Other("block 0 is written by the commit only".into()));
            }
            seal(&mut data[..], *kind);
            w.write(*b, &data[..])?;
        }
        let data_sm = write_data_sm(&mut w, &self.data)?;
        let metadata_sm = write_metadata_sm(&mut w)?;
        w.commit(&superblock(&data_sm, &metadata_sm))
    }
}
