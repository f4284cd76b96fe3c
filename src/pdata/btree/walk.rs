//! The one btree walker. Every tool walks trees through it.
//!
//! A walk descends the internal levels of a tree depth first and produces the
//! tree's leaves in key order (the leaves themselves are read afterwards, in
//! sorted batches, by the caller). The walker remembers every node it has
//! reached across all walks, so a subtree shared by several trees (thin
//! snapshots, the metadata snapshot) is read once: when it is reached again
//! its leaf sequence is replayed from memory, and it is not descended again.
//!
//! It optionally counts references the way the kernel's metadata space map
//! does: each distinct internal node adds one to each child it points at.
//!
//! Damage does not stop a walk: a bad node is recorded as an [`Issue`] with
//! the key range it cuts off, and the walk goes on with its siblings. Tools
//! that cannot tolerate damage (dump) check `issues` and stop.

use std::collections::HashMap;

use fixedbitset::FixedBitSet;

use super::node::Node;
use crate::pdata::counts::RefCounts;
use crate::pdata::error::{Error, Result};
use crate::pdata::io::BlockDevice;
use crate::pdata::mem::{HugeZeroed, Populate};
use crate::pdata::BLOCK_SIZE;

/// Trees deeper than this are treated as damaged (real ones are 1–5 levels).
pub const MAX_HEIGHT: usize = 16;

/// Something wrong found during a walk.
#[derive(Debug)]
pub struct Issue {
    pub error: Error,
    /// False for problems the kernel tolerates (node fill): they fail a check
    /// unless non-fatal errors are ignored.
    pub fatal: bool,
    /// Keys `[lo, hi)` of the tree the damage cuts off (informational).
    pub keys: (u64, u64),
}

/// The leaves of one walked tree, in key order.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeLeaves {
    start: usize,
    end: usize,
}

impl TreeLeaves {
    pub fn len(&self) -> usize {
        self.end - self.start
    }
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

#[derive(Clone, Copy)]
struct Span {
    start: u32,
    end: u32,
    height: u8,
    first_key: u64,
    last_key: u64,
    done: bool,
}

pub struct Walker<'d> {
    dev: &'d BlockDevice,
    seen: FixedBitSet,
    /// Internal nodes reached so far: their leaf span in `arena`, height, keys.
    internal: HashMap<u64, Span>,
    /// The blocks `internal` holds: a leaf reached again (snapshots share
    /// leaves under copied internal nodes: millions of times on a large
    /// pool) is told from an internal node without hashing.
    is_internal: FixedBitSet,
    /// Internal-level blocks that could not be used.
    broken: FixedBitSet,
    /// Leaf sequences of all walks; shared subtrees are copied from here.
    arena: Vec<u64>,
    /// Per block: for a leaf, the intersection `[lo, hi)` of the key ranges
    /// its parents give it; (0, 0) for none (a real range has hi > 0):
    /// words `2b` and `2b + 1`. Allocated (zeroed, so untouched pages cost
    /// nothing) at the first leaf; reached at random (leaves lie anywhere).
    leaf_bounds: HugeZeroed,
    /// Leaves reached for the first time, in discovery order, since the last take.
    fresh: Vec<u64>,
    refs: Option<RefCounts>,
    pub issues: Vec<Issue>,
    buf: Vec<u8>,
    /// Vectors for an internal node's children, one per depth being walked.
    spare_children: Vec<Vec<(u64, u64, u64)>>,
}

impl<'d> Walker<'d> {
    pub fn new(dev: &'d BlockDevice) -> Walker<'d> {
        let nr = dev.nr_blocks() as usize;
        Walker {
            dev,
            seen: FixedBitSet::with_capacity(nr),
            internal: HashMap::new(),
            is_internal: FixedBitSet::with_capacity(nr),
            broken: FixedBitSet::with_capacity(nr),
            arena: Vec::new(),
            leaf_bounds: HugeZeroed::new(0),
            fresh: Vec::new(),
            refs: None,
            issues: Vec::new(),
            buf: vec![0u8; BLOCK_SIZE],
            spare_children: Vec::new(),
        }
    }

    /// Forget every walk, as a new walker would, but keep the allocations:
    /// the per-block leaf ranges are cleared only where a walk set them (a
    /// range is only ever set on a block marked seen), so a walker reused
    /// for many trees does not pay for a zeroed array per tree.
    fn reset(&mut self) {
        if !self.leaf_bounds.is_empty() {
            let words = self.leaf_bounds.words_mut();
            for b in self.seen.ones() {
                words[2 * b..2 * b + 2].fill(0);
            }
        }
        self.seen.clear();
        self.internal.clear();
        self.is_internal.clear();
        self.broken.clear();
        self.arena.clear();
        self.fresh.clear();
        if self.refs.is_some() {
            self.refs = Some(RefCounts::new(self.dev.nr_blocks()));
        }
        self.issues.clear();
    }

    /// Also count metadata references (for checking the metadata space map).
    pub fn with_ref_counts(mut self) -> Self {
        self.refs = Some(RefCounts::new(self.dev.nr_blocks()));
        self
    }

    pub fn device(&self) -> &'d BlockDevice {
        self.dev
    }

    /// Count one reference to metadata block `b` (a root held by a
    /// superblock or a leaf value, a bitmap, the superblock itself).
    pub fn inc_ref(&mut self, b: u64) {
        if let Some(r) = &mut self.refs {
            r.inc(b);
        }
    }

    pub fn ref_counts(&self) -> Option<&RefCounts> {
        self.refs.as_ref()
    }

    pub fn take_ref_counts(&mut self) -> Option<RefCounts> {
        self.refs.take()
    }

    /// The leaves of a walked tree, in key order.
    pub fn leaves(&self, t: &TreeLeaves) -> &[u64] {
        &self.arena[t.start..t.end]
    }

    /// Leaves reached for the first time since the last call (each distinct
    /// leaf is returned exactly once over a walker's life).
    pub fn take_fresh_leaves(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.fresh)
    }

    /// True once block `b` has been reached by any walk.
    pub fn is_seen(&self, b: u64) -> bool {
        (b as usize) < self.seen.len() && self.seen.contains(b as usize)
    }

    /// Mark a block as used (for blocks that are not tree nodes), so that a
    /// tree pointing at it is caught as sharing a block with something else.
    pub fn mark_seen(&mut self, b: u64) -> bool {
        if (b as usize) >= self.seen.len() {
            return false;
        }
        !self.seen.put(b as usize)
    }

    /// The key range the parents give `leaf` (`0..u64::MAX` when unknown).
    fn leaf_range(&self, leaf: u64) -> (u64, u64) {
        self.leaf_bounds_of(leaf).unwrap_or((0, u64::MAX))
    }

    /// The key range the parents give `leaf`, if any gave one.
    #[inline]
    fn leaf_bounds_of(&self, leaf: u64) -> Option<(u64, u64)> {
        let i = (leaf as usize).checked_mul(2)?;
        let hi = self.leaf_bounds.get(i + 1).filter(|&hi| hi != 0)?;
        Some((self.leaf_bounds.words()[i], hi))
    }

    /// Allocate the per-block leaf ranges now, and return a handle that
    /// faults their memory in (tens of MiB on a large pool, zeroed by the
    /// kernel at first touch) from a thread with time to spare, while this
    /// walker walks. None for a table in ordinary pages (a smaller pool),
    /// whose untouched pages are better left untouched.
    pub fn leaf_bounds_memory(&mut self) -> Option<Populate> {
        self.alloc_leaf_bounds();
        self.leaf_bounds
            .is_huge()
            .then(|| self.leaf_bounds.populate_handle())
    }

    fn alloc_leaf_bounds(&mut self) {
        if self.leaf_bounds.is_empty() {
            self.leaf_bounds = HugeZeroed::new_table(2 * self.dev.nr_blocks() as usize);
        }
    }

    /// Validate a leaf read by the caller: node checks, the leaf flag, and
    /// keys inside every range its parents give it.
    pub fn check_leaf<'a>(&self, loc: u64, data: &'a [u8], value_size: usize) -> Result<Node<'a>> {
        let node = parse_leaf(loc, data, value_size)?;
        if let Some((lo, hi)) = self.leaf_bounds_of(loc) {
            if let (Some(first), Some(last)) = (node.first_key(), node.last_key()) {
                if first < lo || last >= hi {
                    return Err(Error::invalid(
                        loc,
                        format!("leaf keys {first}..={last} lie outside the range {lo}..{hi} its parent gives"),
                    ));
                }
            }
        }
        Ok(node)
    }

    /// Node-fill problem of a leaf (non-fatal).
    pub fn leaf_fill_issue(&self, node: &Node, is_root: bool) -> Option<Issue> {
        node.fill_problem(is_root).map(|p| Issue {
            error: Error::invalid(node.block(), p),
            fatal: false,
            keys: (node.first_key().unwrap_or(0), u64::MAX),
        })
    }

    /// Walk the tree at `root` whose leaves hold `value_size`-byte values.
    /// The caller counts the reference to `root` itself (see [`Self::inc_ref`]).
    pub fn walk(&mut self, root: u64, value_size: usize) -> TreeLeaves {
        let start = self.arena.len();
        if root >= self.dev.nr_blocks() {
            self.issue(
                Error::OutOfBounds {
                    block: root,
                    nr_blocks: self.dev.nr_blocks(),
                },
                (0, u64::MAX),
            );
            return TreeLeaves { start, end: start };
        }
        if self.is_seen(root) {
            self.revisit(root, None, (0, u64::MAX));
        } else {
            match self.height(root, value_size) {
                Ok(0) => self.reach_leaf(root, (0, u64::MAX)),
                Ok(h) => {
                    self.seen.insert(root as usize);
                    self.descend(root, 0, h, value_size, (0, u64::MAX));
                }
                Err(e) => {
                    self.seen.insert(root as usize);
                    self.broken.insert(root as usize);
                    self.issue(e, (0, u64::MAX));
                }
            }
        }
        TreeLeaves {
            start,
            end: self.arena.len(),
        }
    }

    fn issue(&mut self, error: Error, keys: (u64, u64)) {
        self.issues.push(Issue {
            error,
            fatal: true,
            keys,
        });
    }

    fn read(&mut self, b: u64) -> Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.dev.read_block(b, &mut buf);
        self.buf = buf;
        r
    }

    /// Height of the tree at `root` (0 = the root is a leaf), found by
    /// following the first usable child down to a leaf.
    fn height(&mut self, root: u64, value_size: usize) -> Result<usize> {
        let mut path = Vec::new();
        self.height_from(root, value_size, &mut path)
    }

    fn height_from(&mut self, b: u64, value_size: usize, path: &mut Vec<u64>) -> Result<usize> {
        if path.len() > MAX_HEIGHT {
            return Err(Error::invalid(
                b,
                format!("tree is deeper than {MAX_HEIGHT} levels (a loop?)"),
            ));
        }
        self.read(b)?;
        let node = Node::parse(b, &self.buf, value_size)?;
        if node.is_leaf() {
            return Ok(0);
        }
        let children: Vec<u64> = (0..node.nr_entries()).map(|i| node.child(i)).collect();
        path.push(b);
        let mut last = None;
        for c in children {
            if path.contains(&c) {
                last = Some(Error::invalid(
                    b,
                    format!("node points back at its ancestor {c} (a loop)"),
                ));
                continue;
            }
            match self.height_from(c, value_size, path) {
                Ok(h) => {
                    path.pop();
                    return Ok(h + 1);
                }
                Err(e) => last = Some(e),
            }
        }
        path.pop();
        Err(last.unwrap_or_else(|| Error::invalid(b, "internal node has no usable child")))
    }

    /// Ask for the key ranges of the leaves an internal node points at
    /// before they are reached: leaves lie anywhere on the device, so
    /// each one's range is a cache miss, and a node's worth of misses is
    /// better under way at once than one after another.
    fn prefetch_leaf_ranges(&mut self, leaves: impl Iterator<Item = u64>) {
        self.alloc_leaf_bounds();
        #[cfg(target_arch = "x86_64")]
        for leaf in leaves {
            // And its reference count, the other random touch per leaf.
            if let Some(r) = &self.refs {
                r.prefetch(leaf);
            }
            if let Some(r) = self.leaf_bounds.words().get(2 * leaf as usize) {
                // SAFETY: prefetching is a hint; the address is in bounds.
                unsafe {
                    std::arch::x86_64::_mm_prefetch(
                        (r as *const u64).cast::<i8>(),
                        std::arch::x86_64::_MM_HINT_T0,
                    )
                };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = leaves;
    }

    fn reach_leaf(&mut self, leaf: u64, (lo, hi): (u64, u64)) {
        self.arena.push(leaf);
        self.alloc_leaf_bounds();
        let i = 2 * leaf as usize;
        let words = self.leaf_bounds.words_mut();
        if !self.seen.put(leaf as usize) {
            // Written without a look first: a block reached for the first
            // time has no range yet, and its page is not read before it is
            // written (see `pdata::mem`).
            words[i] = lo;
            words[i + 1] = hi;
            self.fresh.push(leaf);
            return;
        }
        if words[i + 1] == 0 {
            // Seen as something else first (reported below).
            words[i] = lo;
            words[i + 1] = hi;
        } else {
            words[i] = words[i].max(lo);
            words[i + 1] = words[i + 1].min(hi);
        }
        if self.is_internal.contains(leaf as usize) || self.broken.contains(leaf as usize) {
            self.arena.pop();
            self.issue(
                Error::invalid(leaf, "block is used both as an internal node and as a leaf"),
                (lo, hi),
            );
        }
    }

    /// `b` was reached before: replay its leaves (for an internal node) or
    /// take it as a leaf. `expected_height` is None for a root.
    fn revisit(&mut self, b: u64, expected_height: Option<usize>, keys: (u64, u64)) {
        if self.broken.contains(b as usize) {
            return; // reported when first reached
        }
        let span = if self.is_internal.contains(b as usize) {
            self.internal.get(&b).copied()
        } else {
            None
        };
        match span {
            Some(span) if !span.done => {
                self.issue(
                    Error::invalid(b, "node is its own ancestor (a loop in the tree)"),
                    keys,
                );
            }
            Some(span) => {
                if let Some(h) = expected_height {
                    if h != span.height as usize {
                        self.issue(
                            Error::invalid(
                                b,
                                format!(
                                    "shared node sits at height {} here but {} elsewhere",
                                    h, span.height
                                ),
                            ),
                            keys,
                        );
                        return;
                    }
                }
                if span.first_key < keys.0 || span.last_key >= keys.1 {
                    self.issue(
                        Error::invalid(
                            b,
                            format!(
                                "node keys {}..={} lie outside the range {}..{} its parent gives",
                                span.first_key, span.last_key, keys.0, keys.1
                            ),
                        ),
                        keys,
                    );
                }
                self.arena
                    .extend_from_within(span.start as usize..span.end as usize);
            }
            None => {
                if expected_height.unwrap_or(0) == 0 {
                    self.reach_leaf(b, keys);
                } else {
                    self.issue(
                        Error::invalid(b, "a leaf is referenced where an internal node should be"),
                        keys,
                    );
                }
            }
        }
    }

    /// Walk internal node `b` at `depth` of a tree of height `height`, first visit.
    fn descend(
        &mut self,
        b: u64,
        depth: usize,
        height: usize,
        value_size: usize,
        keys: (u64, u64),
    ) {
        if let Err(e) = self.read(b) {
            self.broken.insert(b as usize);
            self.issue(e, keys);
            return;
        }
        let node = match Node::parse(b, &self.buf, value_size) {
            Ok(n) => n,
            Err(e) => {
                self.broken.insert(b as usize);
                self.issue(e, keys);
                return;
            }
        };
        if node.is_leaf() {
            self.broken.insert(b as usize);
            self.issue(
                Error::invalid(
                    b,
                    format!(
                        "leaf found at depth {depth}; this tree's leaves are at depth {height}"
                    ),
                ),
                keys,
            );
            return;
        }
        let fill = node.fill_problem(depth == 0);
        let first_key = node.key(0);
        let last_key = node.last_key().unwrap_or(first_key);
        let nr = node.nr_entries();
        // The children with their key ranges, copied out of the node (the
        // walk below reads other nodes into the same buffer) into a vector
        // kept for the next node at this depth.
        let mut children = self.spare_children.pop().unwrap_or_default();
        children.clear();
        children.extend((0..nr).map(|i| {
            let lo = node.key(i);
            let hi = if i + 1 < nr { node.key(i + 1) } else { keys.1 };
            (node.child(i), lo, hi)
        }));
        if let Some(p) = fill {
            self.issues.push(Issue {
                error: Error::invalid(b, p),
                fatal: false,
                keys,
            });
        }
        if first_key < keys.0 || last_key >= keys.1 {
            self.issue(
                Error::invalid(
                    b,
                    format!(
                        "node keys {}..={} lie outside the range {}..{} its parent gives",
                        first_key, last_key, keys.0, keys.1
                    ),
                ),
                keys,
            );
        }

        let start = self.arena.len() as u32;
        self.is_internal.insert(b as usize);
        self.internal.insert(
            b,
            Span {
                start,
                end: start,
                height: (height - depth) as u8,
                first_key,
                last_key,
                done: false,
            },
        );
        let nr_blocks = self.dev.nr_blocks();
        if height - depth == 1 {
            self.prefetch_leaf_ranges(children.iter().map(|c| c.0));
        }
        for &(child, lo, hi) in &children {
            if let Some(r) = &mut self.refs {
                r.inc(child);
            }
            if child >= nr_blocks {
                self.issue(Error::invalid(b, format!("child pointer {child} is beyond the end of the device ({nr_blocks} blocks)")), (lo, hi));
                continue;
            }
            let child_height = height - depth - 1;
            if self.is_seen(child) {
                self.revisit(child, Some(child_height), (lo, hi));
            } else if child_height == 0 {
                self.reach_leaf(child, (lo, hi));
            } else {
                self.seen.insert(child as usize);
                self.descend(child, depth + 1, height, value_size, (lo, hi));
            }
        }
        self.spare_children.push(children);
        let end = self.arena.len() as u32;
        if let Some(s) = self.internal.get_mut(&b) {
            s.end = end;
            s.done = true;
        }
    }
}

/// Validate a leaf read by the caller: node checks and the leaf flag, but no
/// parent's key range (callers that check ranges themselves, per parent).
pub fn parse_leaf(loc: u64, data: &[u8], value_size: usize) -> Result<Node<'_>> {
    let node = Node::parse(loc, data, value_size)?;
    if !node.is_leaf() {
        return Err(Error::invalid(
            loc,
            "internal node found where the tree's leaves are",
        ));
    }
    Ok(node)
}

/// Salvage reading of several trees (thin_repair, thin_dump --repair): the
/// usable leaves of each tree at `roots`, in key order. Each tree is walked
/// on its own, so damage in one tree (a pointer into another tree, a node
/// copied over another tree's node) cannot take leaves away from the other
/// trees: a leaf is kept in a tree when it is a valid leaf and its keys lie
/// in the range the parents in *that* tree give it. Each distinct leaf is
/// read once; `on_leaf` sees each one that is valid (for callers that want
/// its entries without reading it again).
pub fn salvage_leaves(
    dev: &BlockDevice,
    roots: &[u64],
    value_size: usize,
    mut on_leaf: impl FnMut(&Node),
) -> Vec<Vec<u64>> {
    type Bounded = Vec<(u64, (u64, u64))>;
    let mut trees: Vec<Bounded> = Vec::with_capacity(roots.len());
    // One walker, reset between trees: each tree is still walked as by a
    // walker of its own.
    let mut w = Walker::new(dev);
    for &root in roots {
        w.reset();
        let t = w.walk(root, value_size);
        trees.push(w.leaves(&t).iter().map(|&l| (l, w.leaf_range(l))).collect());
    }
    let mut all: Vec<u64> = trees.iter().flatten().map(|&(l, _)| l).collect();
    all.sort_unstable();
    all.dedup();
    // Leaf -> its first and last key (None: a valid empty leaf). Salvage
    // also wants the max_entries every writer (the kernel, the peer, this
    // project) gives a leaf of this value size: with another one the values
    // are read from the wrong place, and the resulting mappings would be
    // invented.
    let mut keys: HashMap<u64, Option<(u64, u64)>> = HashMap::with_capacity(all.len());
    dev.read_in_order(&all, 1024, |_, b, data| {
        if let Ok(node) = data.and_then(|d| parse_leaf(b, d, value_size)) {
            if node.max_entries() == super::node::max_entries(value_size) {
                on_leaf(&node);
                keys.insert(b, node.first_key().zip(node.last_key()));
            }
        }
        Ok::<(), std::convert::Infallible>(())
    })
    .ok();
    trees
        .into_iter()
        .map(|t| {
            t.into_iter()
                .filter(|(l, (lo, hi))| match keys.get(l) {
                    Some(Some((first, last))) => first >= lo && last < hi,
                    Some(None) => true,
                    None => false,
                })
                .map(|(l, _)| l)
                .collect()
        })
        .collect()
}

/// The entries of a one-level tree (or one level's worth of leaves) read through a walker.
pub struct MapRead<V> {
    pub entries: Vec<(u64, V)>,
    pub issues: Vec<Issue>,
}

impl<'d> Walker<'d> {
    /// Walk the tree at `root` and read all its leaves, in key order.
    /// `on_fresh_leaf` sees each leaf the walker had never reached before
    /// exactly once (to count what its values reference).
    pub fn read_map<V: super::Value>(
        &mut self,
        root: u64,
        mut on_fresh_leaf: impl FnMut(&Node),
    ) -> MapRead<V> {
        let before = self.issues.len();
        let tree = self.walk(root, V::SIZE);
        let mut issues: Vec<Issue> = self.issues.drain(before..).collect();
        let leaves = self.leaves(&tree).to_vec();
        let fresh: std::collections::HashSet<u64> = self.take_fresh_leaves().into_iter().collect();
        let mut entries = Vec::new();
        let is_root_leaf = leaves.len() == 1 && leaves[0] == root;
        let dev = self.dev;
        dev.read_in_order(&leaves, 256, |_, b, data| {
            match data.and_then(|d| self.check_leaf(b, d, V::SIZE)) {
                Ok(node) => {
                    entries.extend(node.entries::<V>());
                    if fresh.contains(&b) {
                        if let Some(i) = self.leaf_fill_issue(&node, is_root_leaf) {
                            issues.push(i);
                        }
                        on_fresh_leaf(&node);
                    }
                }
                Err(e) => issues.push(Issue {
                    error: e,
                    fatal: true,
                    keys: (0, u64::MAX),
                }),
            }
            Ok::<(), std::convert::Infallible>(())
        })
        .ok();
        MapRead { entries, issues }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::super::node::testutil::build;
    use super::*;
    use crate::pdata::io::OpenMode;

    fn leaf(loc: u64, keys: &[u64]) -> Vec<u8> {
        let vals: Vec<[u8; 8]> = keys.iter().map(|k| (k + 1000).to_le_bytes()).collect();
        let refs: Vec<&[u8]> = vals.iter().map(|v| &v[..]).collect();
        build(loc, true, keys, &refs, 8)
    }

    fn internal(loc: u64, keys: &[u64], children: &[u64]) -> Vec<u8> {
        let vals: Vec<[u8; 8]> = children.iter().map(|c| c.to_le_bytes()).collect();
        let refs: Vec<&[u8]> = vals.iter().map(|v| &v[..]).collect();
        build(loc, false, keys, &refs, 8)
    }

    /// Tree A (root 1): leaves 2 (keys 0, 1) and 3 (keys 100, 101).
    /// Tree B (root 4), damaged: leaves 5 (keys 0, 1), 3 (a pointer into
    /// tree A, for keys 50..60 where leaf 3 holds 100, 101) and 6 (keys 60, 61).
    fn two_trees() -> tempfile::NamedTempFile {
        let blocks = [
            vec![0u8; BLOCK_SIZE],
            internal(1, &[0, 100], &[2, 3]),
            leaf(2, &[0, 1]),
            leaf(3, &[100, 101]),
            internal(4, &[0, 50, 60], &[5, 3, 6]),
            leaf(5, &[0, 1]),
            leaf(6, &[60, 61]),
            vec![0u8; BLOCK_SIZE],
        ];
        let mut f = tempfile::NamedTempFile::new().unwrap();
        for b in &blocks {
            f.write_all(b).unwrap();
        }
        f.flush().unwrap();
        f
    }

    #[test]
    fn salvage_keeps_each_trees_leaves_in_any_order() {
        let f = two_trees();
        let dev = BlockDevice::open(f.path(), OpenMode::ReadOnly).unwrap();
        let a: Vec<u64> = vec![2, 3];
        let b: Vec<u64> = vec![5, 6];
        // The damaged tree never takes leaf 3 away from the sound one, walked
        // before or after it, and a tree walked twice gives the same leaves.
        assert_eq!(
            salvage_leaves(&dev, &[1, 4], 8, |_| {}),
            [a.clone(), b.clone()]
        );
        assert_eq!(
            salvage_leaves(&dev, &[4, 1], 8, |_| {}),
            [b.clone(), a.clone()]
        );
        assert_eq!(
            salvage_leaves(&dev, &[1, 4, 1, 4], 8, |_| {}),
            [a.clone(), b.clone(), a.clone(), b]
        );
    }

    #[test]
    fn a_reset_walker_walks_as_a_new_one() {
        let f = two_trees();
        let dev = BlockDevice::open(f.path(), OpenMode::ReadOnly).unwrap();
        let state = |w: &Walker, t: &TreeLeaves| {
            let ranges: Vec<(u64, u64)> = (0..8).map(|b| w.leaf_range(b)).collect();
            let seen: Vec<bool> = (0..8).map(|b| w.is_seen(b)).collect();
            let issues: Vec<String> = w.issues.iter().map(|i| i.error.to_string()).collect();
            (w.leaves(t).to_vec(), ranges, seen, issues, w.fresh.clone())
        };
        for (first, second) in [(1, 4), (4, 1), (4, 4)] {
            let mut fresh = Walker::new(&dev);
            let t = fresh.walk(second, 8);
            let want = state(&fresh, &t);

            let mut w = Walker::new(&dev);
            w.walk(first, 8);
            w.reset();
            let t = w.walk(second, 8);
            assert_eq!(state(&w, &t), want, "{first} then {second}");
        }
        // Without the reset, the second walk would see the first one's leaf 3.
        let mut w = Walker::new(&dev);
        w.walk(4, 8);
        let t = w.walk(1, 8);
        assert_ne!(w.leaf_range(3), (100, u64::MAX));
        assert_eq!(w.leaves(&t), &[2, 3]);
    }
}
