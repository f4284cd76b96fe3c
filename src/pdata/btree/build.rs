//! Bulk building of btrees from entries in key order.
//!
//! Entries fill nodes to `max_entries`; each finished node goes up as one
//! entry (its first key, its block) of the level above. The last node of a
//! level is never left below a third full while it has a sibling (the kernel
//! and thin_check expect non-root nodes at least a third full): a full node
//! is held back until the next one starts, and the two are rebalanced if the
//! last one ends up short.
//!
//! Shared nodes (a leaf that several trees reference, as `<def>`/`<ref>`
//! restore them) are spliced in whole with [`TreeBuilder::push_shared_leaf`].
//!
//! Reference counting follows the kernel: a node's count is its number of
//! parents (a root's count is the reference its owner holds). Every node a
//! builder writes gets one reference from its parent; the root returned by
//! [`TreeBuilder::finish`] carries one count for the caller's reference.

use crate::pdata::btree::node::{max_entries, INTERNAL_NODE, LEAF_NODE, NODE_HEADER_SIZE};
use crate::pdata::checksum::{seal, BlockKind};
use crate::pdata::writer::BlockWriter;
use crate::pdata::{le64, Result, BLOCK_SIZE};

/// A node being filled, laid out as on disk.
struct NodeBuf {
    data: Box<[u8; BLOCK_SIZE]>,
    nr: usize,
    max: usize,
    value_size: usize,
}

impl NodeBuf {
    fn new(value_size: usize) -> Self {
        NodeBuf {
            data: Box::new([0; BLOCK_SIZE]),
            nr: 0,
            max: max_entries(value_size),
            value_size,
        }
    }

    fn value_off(&self, i: usize) -> usize {
        NODE_HEADER_SIZE + 8 * self.max + self.value_size * i
    }

    fn push(&mut self, key: u64, value: &[u8], dry: bool) {
        debug_assert!(self.nr < self.max);
        if dry {
            // A dry run only counts nodes: contents do not matter.
            self.nr += 1;
            return;
        }
        debug_assert_eq!(value.len(), self.value_size);
        let k = NODE_HEADER_SIZE + 8 * self.nr;
        self.data[k..k + 8].copy_from_slice(&key.to_le_bytes());
        let v = self.value_off(self.nr);
        self.data[v..v + self.value_size].copy_from_slice(value);
        self.nr += 1;
    }

    fn first_key(&self) -> u64 {
        le64(&self.data[..], NODE_HEADER_SIZE)
    }

    /// Move the last `n` entries of `self` to the front of `next`.
    fn shift_tail_to(&mut self, next: &mut NodeBuf, n: usize, dry: bool) {
        if dry {
            self.nr -= n;
            next.nr += n;
            return;
        }
        let (vs, m) = (self.value_size, next.nr);
        // Make room at the front of `next`.
        let kb = NODE_HEADER_SIZE;
        next.data.copy_within(kb..kb + 8 * m, kb + 8 * n);
        let vb = next.value_off(0);
        next.data.copy_within(vb..vb + vs * m, vb + vs * n);
        // Copy the tail of `self` in, and clear it here (unused slots stay zero).
        let from = self.nr - n;
        let ks = kb + 8 * from;
        next.data[kb..kb + 8 * n].copy_from_slice(&self.data[ks..ks + 8 * n]);
        self.data[ks..ks + 8 * n].fill(0);
        let vsrc = self.value_off(from);
        next.data[vb..vb + vs * n].copy_from_slice(&self.data[vsrc..vsrc + vs * n]);
        self.data[vsrc..vsrc + vs * n].fill(0);
        self.nr = from;
        next.nr = m + n;
    }

    /// Write the node at a fresh block; the buffer is cleared for reuse.
    fn emit(&mut self, w: &mut BlockWriter, leaf: bool) -> Result<(u64, u64)> {
        let b = w.alloc()?;
        if w.is_dry_run() {
            self.nr = 0;
            return Ok((0, b));
        }
        let d = &mut self.data[..];
        let flags = if leaf { LEAF_NODE } else { INTERNAL_NODE };
        d[4..8].copy_from_slice(&flags.to_le_bytes());
        d[8..16].copy_from_slice(&b.to_le_bytes());
        d[16..20].copy_from_slice(&(self.nr as u32).to_le_bytes());
        d[20..24].copy_from_slice(&(self.max as u32).to_le_bytes());
        d[24..28].copy_from_slice(&(self.value_size as u32).to_le_bytes());
        seal(d, BlockKind::BTreeNode);
        w.write(b, d)?;
        let first = self.first_key();
        self.data.fill(0);
        self.nr = 0;
        Ok((first, b))
    }
}

/// One level of the tree under construction.
struct Level {
    leaf: bool,
    cur: NodeBuf,
    /// A full node held back so the last node of the level can borrow from it.
    held: Option<NodeBuf>,
}

impl Level {
    fn new(leaf: bool, value_size: usize) -> Self {
        Level {
            leaf,
            cur: NodeBuf::new(value_size),
            held: None,
        }
    }
}

pub struct TreeBuilder {
    levels: Vec<Level>,
    /// Leaves-only mode: finished leaves are collected here, unreferenced.
    leaves: Option<Vec<(u64, u64)>>,
}

impl TreeBuilder {
    /// A builder of a tree whose leaves hold `value_size`-byte values.
    pub fn new(value_size: usize) -> Self {
        TreeBuilder {
            levels: vec![Level::new(true, value_size)],
            leaves: None,
        }
    }

    /// A builder of a run of leaves with no tree above them (a `<def>`):
    /// [`TreeBuilder::finish_leaves`] returns them as (first key, block),
    /// with no references counted; trees that take them in with
    /// [`TreeBuilder::push_shared_leaf`] hold the references.
    pub fn leaves_only(value_size: usize) -> Self {
        TreeBuilder {
            levels: vec![Level::new(true, value_size)],
            leaves: Some(Vec::new()),
        }
    }

    /// Finish a leaves-only builder.
    pub fn finish_leaves(mut self, w: &mut BlockWriter) -> Result<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        self.take_leaves(w, &mut out)?;
        Ok(out)
    }

    /// Finish a leaves-only builder's run of leaves, appending them to
    /// `out`. The builder is empty again, ready for the next run with its
    /// buffers (a restore builds hundreds of thousands of defs).
    pub fn take_leaves(&mut self, w: &mut BlockWriter, out: &mut Vec<(u64, u64)>) -> Result<()> {
        self.flush_level(w, 0)?;
        if let Some(l) = self.leaves.as_mut() {
            out.append(l);
        }
        Ok(())
    }

    /// Add a leaf entry. Keys must come in strictly increasing order.
    pub fn push(&mut self, w: &mut BlockWriter, key: u64, value: &[u8]) -> Result<()> {
        self.push_at(w, 0, key, value)
    }

    /// Add an existing leaf (shared with other trees) whose first key is
    /// `first_key`: its count goes up by one for this tree's reference.
    pub fn push_shared_leaf(&mut self, w: &mut BlockWriter, first_key: u64, b: u64) -> Result<()> {
        self.flush_level(w, 0)?;
        w.inc(b);
        self.push_at(w, 1, first_key, &b.to_le_bytes())
    }

    /// Add `n` leaf entries with consecutive keys from `first_key` and the
    /// 8-byte values `value(0) .. value(n - 1)` (a run of mappings): written
    /// straight into the node, a node's worth at a time.
    pub fn push_run(
        &mut self,
        w: &mut BlockWriter,
        first_key: u64,
        n: u64,
        value: impl Fn(u64) -> u64,
    ) -> Result<()> {
        debug_assert_eq!(self.levels[0].cur.value_size, 8);
        let dry = w.is_dry_run();
        let mut i = 0;
        while i < n {
            self.make_room(w, 0)?;
            let cur = &mut self.levels[0].cur;
            let k = ((cur.max - cur.nr) as u64).min(n - i);
            if !dry {
                for j in 0..k {
                    let slot = cur.nr + j as usize;
                    let ko = NODE_HEADER_SIZE + 8 * slot;
                    cur.data[ko..ko + 8].copy_from_slice(&(first_key + i + j).to_le_bytes());
                    let vo = cur.value_off(slot);
                    cur.data[vo..vo + 8].copy_from_slice(&value(i + j).to_le_bytes());
                }
            }
            cur.nr += k as usize;
            i += k;
        }
        Ok(())
    }

    /// Add a leaf entry whose value is `N` bytes: [`TreeBuilder::push`]
    /// for millions of small entries (a ref-count tree), its copies of
    /// known length.
    #[inline]
    pub fn push_array<const N: usize>(
        &mut self,
        w: &mut BlockWriter,
        key: u64,
        value: &[u8; N],
    ) -> Result<()> {
        self.make_room(w, 0)?;
        let cur = &mut self.levels[0].cur;
        debug_assert_eq!(cur.value_size, N);
        if !w.is_dry_run() {
            let k = NODE_HEADER_SIZE + 8 * cur.nr;
            cur.data[k..k + 8].copy_from_slice(&key.to_le_bytes());
            let v = cur.value_off(cur.nr);
            cur.data[v..v + N].copy_from_slice(value);
        }
        cur.nr += 1;
        Ok(())
    }

    /// In a dry run, account for `n` more leaf entries (whose keys and
    /// values a dry run does not look at): the same nodes are allocated as
    /// if they were pushed one by one.
    pub fn push_dry(&mut self, w: &mut BlockWriter, n: u64) -> Result<()> {
        debug_assert!(w.is_dry_run());
        let mut i = 0;
        while i < n {
            self.make_room(w, 0)?;
            let cur = &mut self.levels[0].cur;
            let k = ((cur.max - cur.nr) as u64).min(n - i);
            cur.nr += k as usize;
            i += k;
        }
        Ok(())
    }

    /// Make sure level `lvl`'s current node has room for an entry: a full
    /// one is held back, and the one held before it is written.
    fn make_room(&mut self, w: &mut BlockWriter, lvl: usize) -> Result<()> {
        let l = &mut self.levels[lvl];
        if l.cur.nr == l.cur.max {
            match l.held.take() {
                Some(mut prev) => {
                    // Written and cleared, the held node's buffer takes the
                    // next entries (no allocation a node).
                    let (k, b) = prev.emit(w, l.leaf)?;
                    l.held = Some(std::mem::replace(&mut l.cur, prev));
                    self.up(w, lvl, k, b)?;
                }
                None => {
                    let vs = l.cur.value_size;
                    l.held = Some(std::mem::replace(&mut l.cur, NodeBuf::new(vs)));
                }
            }
        }
        Ok(())
    }

    fn push_at(&mut self, w: &mut BlockWriter, lvl: usize, key: u64, value: &[u8]) -> Result<()> {
        if lvl == self.levels.len() {
            self.levels.push(Level::new(false, 8));
        }
        self.make_room(w, lvl)?;
        let dry = w.is_dry_run();
        self.levels[lvl].cur.push(key, value, dry);
        Ok(())
    }

    /// A node of level `lvl` was written: reference it from the level above.
    fn up(&mut self, w: &mut BlockWriter, lvl: usize, key: u64, b: u64) -> Result<()> {
        if let (0, Some(leaves)) = (lvl, self.leaves.as_mut()) {
            leaves.push((key, b));
            return Ok(());
        }
        w.inc(b);
        self.push_at(w, lvl + 1, key, &b.to_le_bytes())
    }

    /// Write out everything level `lvl` holds, rebalancing its last two nodes.
    fn flush_level(&mut self, w: &mut BlockWriter, lvl: usize) -> Result<()> {
        let l = &mut self.levels[lvl];
        let leaf = l.leaf;
        // Called before every shared leaf: nothing allocated on the way.
        let mut out = [None, None];
        if let Some(mut prev) = l.held.take() {
            let min = l.cur.max / 3;
            if l.cur.nr > 0 && l.cur.nr < min {
                let n = (prev.nr + l.cur.nr) / 2 - l.cur.nr;
                prev.shift_tail_to(&mut l.cur, n, w.is_dry_run());
            }
            out[0] = Some(prev.emit(w, leaf)?);
        }
        if l.cur.nr > 0 {
            out[1] = Some(l.cur.emit(w, leaf)?);
        }
        for (k, b) in out.into_iter().flatten() {
            self.up(w, lvl, k, b)?;
        }
        Ok(())
    }

    /// Finish the tree and return its root. An empty tree is an empty leaf.
    pub fn finish(mut self, w: &mut BlockWriter) -> Result<u64> {
        let mut lvl = 0;
        loop {
            let top = lvl + 1 == self.levels.len();
            let l = &mut self.levels[lvl];
            if top && l.held.is_none() {
                // Everything left fits one node, and nothing is above it.
                if lvl > 0 && l.cur.nr == 1 {
                    // One child (a lone shared leaf): it is the root, and the
                    // reference its parent would hold is the caller's.
                    return Ok(le64(&l.cur.data[..], l.cur.value_off(0)));
                }
                let leaf = l.leaf;
                let (_, b) = l.cur.emit(w, leaf)?;
                w.inc(b);
                return Ok(b);
            }
            self.flush_level(w, lvl)?;
            lvl += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::btree::node::Node;
    use crate::pdata::io::{BlockDevice, OpenMode};

    fn device(nr_blocks: u64) -> (tempfile::NamedTempFile, BlockDevice) {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(nr_blocks * BLOCK_SIZE as u64).unwrap();
        let dev = BlockDevice::open(f.path(), OpenMode::ReadWriteExclusive).unwrap();
        (f, dev)
    }

    /// Keys of the tree at `root`, checking every node on the way.
    fn collect(dev: &BlockDevice, root: u64, vs: usize, is_root: bool, out: &mut Vec<(u64, u64)>) {
        let mut buf = vec![0u8; BLOCK_SIZE];
        dev.read_block(root, &mut buf).unwrap();
        let n = Node::parse(root, &buf, vs).unwrap();
        assert_eq!(n.fill_problem(is_root), None, "node {root}");
        for i in 0..n.nr_entries() {
            if n.is_leaf() {
                out.push((n.key(i), le64(n.value_bytes(i), 0)));
            } else {
                let mut sub = Vec::new();
                collect(dev, n.child(i), vs, false, &mut sub);
                assert_eq!(sub[0].0, n.key(i));
                out.extend(sub);
            }
        }
    }

    #[test]
    fn trees_of_every_shape_read_back() {
        for n in [
            0u64, 1, 83, 84, 252, 253, 300, 504, 505, 20_000, 63_600, 70_000,
        ] {
            let (_f, dev) = device(2048);
            let mut w = BlockWriter::new(&dev, 2048, None);
            let mut t = TreeBuilder::new(8);
            for k in 0..n {
                t.push(&mut w, k * 3, &(k + 1000).to_le_bytes()).unwrap();
            }
            let root = t.finish(&mut w).unwrap();
            w.flush().unwrap();
            let mut got = Vec::new();
            collect(&dev, root, 8, true, &mut got);
            let want: Vec<(u64, u64)> = (0..n).map(|k| (k * 3, k + 1000)).collect();
            assert_eq!(got, want, "n = {n}");
            // Every written node has exactly one reference.
            let c = w.counts();
            assert_eq!(c.nr_allocated(), w.nr_allocated(), "n = {n}");
            assert_eq!(c.get(root), 1);
        }
    }

    #[test]
    fn shared_leaves_are_referenced_not_copied() {
        let (_f, dev) = device(256);
        let mut w = BlockWriter::new(&dev, 256, None);
        // A shared leaf holding keys 100..200.
        let mut s = TreeBuilder::leaves_only(8);
        for k in 100..200u64 {
            s.push(&mut w, k, &k.to_le_bytes()).unwrap();
        }
        let leaves = s.finish_leaves(&mut w).unwrap();
        assert_eq!(leaves.len(), 1);
        let (first, shared) = leaves[0];
        assert_eq!(first, 100);
        assert_eq!(w.counts().get(shared), 0);
        let mut roots = Vec::new();
        for t in 0..3u64 {
            let mut b = TreeBuilder::new(8);
            for k in 0..100u64 {
                b.push(&mut w, k, &(k + t).to_le_bytes()).unwrap();
            }
            b.push_shared_leaf(&mut w, 100, shared).unwrap();
            for k in 200..300u64 {
                b.push(&mut w, k, &(k + t).to_le_bytes()).unwrap();
            }
            roots.push(b.finish(&mut w).unwrap());
        }
        w.flush().unwrap();
        assert_eq!(w.counts().get(shared), 3);
        for (t, &r) in roots.iter().enumerate() {
            let mut got = Vec::new();
            collect(&dev, r, 8, true, &mut got);
            let t = t as u64;
            let want: Vec<(u64, u64)> = (0..300u64)
                .map(|k| (k, if (100..200).contains(&k) { k } else { k + t }))
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn runs_build_the_same_tree_as_single_entries() {
        for n in [1u64, 251, 252, 253, 600, 5000] {
            let (_f, dev) = device(256);
            let mut w = BlockWriter::new(&dev, 256, None);
            let mut t = TreeBuilder::new(8);
            t.push(&mut w, 0, &7u64.to_le_bytes()).unwrap();
            t.push_run(&mut w, 10, n, |i| 100 + i).unwrap();
            t.push_run(&mut w, 10 + n, 3, |i| i).unwrap();
            let root = t.finish(&mut w).unwrap();
            w.flush().unwrap();
            let mut got = Vec::new();
            collect(&dev, root, 8, true, &mut got);
            let mut want = vec![(0, 7)];
            want.extend((0..n).map(|i| (10 + i, 100 + i)));
            want.extend((0..3).map(|i| (10 + n + i, i)));
            assert_eq!(got, want, "n = {n}");
        }
    }

    #[test]
    fn a_tree_that_is_one_shared_leaf() {
        let (_f, dev) = device(64);
        let mut w = BlockWriter::new(&dev, 64, None);
        let mut s = TreeBuilder::new(8);
        s.push(&mut w, 5, &5u64.to_le_bytes()).unwrap();
        let shared = s.finish(&mut w).unwrap();
        let mut b = TreeBuilder::new(8);
        b.push_shared_leaf(&mut w, 5, shared).unwrap();
        let root = b.finish(&mut w).unwrap();
        assert_eq!(root, shared);
        assert_eq!(w.counts().get(shared), 2);
    }
}
