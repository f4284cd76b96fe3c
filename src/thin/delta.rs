//! thin_delta: the differences between the mappings of two thin devices.
//!
//! # What is printed
//!
//! Every virtual block mapped on either side gets a kind: `same` (both
//! sides map it to the same data block), `different` (both map it, to
//! different data blocks), `left_only` or `right_only`. The output is the
//! maximal runs of consecutive virtual blocks of one kind, in virtual-block
//! order, each with the data block(s) of its first block (printed by
//! `--verbose` only). This is exactly what the peer (thin-provisioning-tools
//! 1.3.x) prints: its runs merge regardless of data contiguity and the time
//! stamps are ignored.
//!
//! # How the trees are compared
//!
//! The two bottom-level mapping trees are walked together, each as a cursor
//! whose head is either a whole unread subtree (block, height, the key range
//! its parent gives it) or the next entry of a leaf read for comparison.
//! When both heads are the same block, that subtree is identical on both
//! sides and is never compared: with `changes_only` it is not even read (a
//! diff of two snapshots that differ by 1 % reads about 1 % of the nodes),
//! otherwise its leaves are read once, in batches, only to list its
//! mappings as `same`. Otherwise the side that is behind in key order (or,
//! at the same position, the taller subtree) is expanded, so subtrees shared
//! at different depths still meet; leaves are then compared entry by entry.
//!
//! Memory: one 4 KiB node per level of each tree (the path), one read batch,
//! and the run being built; nothing grows with the size of the trees.
//!
//! Every node read is validated (checksum, location, header, keys in order
//! and inside the range the parent gives, all leaves at the same depth); the
//! first damaged node stops the delta with an error naming it.

use std::fmt;
use std::io::{self, Write};

use crate::pdata::btree::{Node, Walker, MAX_HEIGHT};
use crate::pdata::error::Error as PError;
use crate::pdata::io::BlockDevice;
use crate::pdata::BLOCK_SIZE;
use crate::thin::dump::{select_superblock, XmlLines};
use crate::thin::superblock::NEEDS_CHECK_FLAG;
use crate::thin::Error;

/// Leaves read per batch when listing a subtree (1 MiB).
const BATCH: usize = 256;

/// One side of the delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A thin device, looked up in the top level of the mapping tree.
    Device(u64),
    /// A bottom-level mapping tree given by its root block.
    Root(u64),
}

#[derive(Debug, Clone)]
pub struct DeltaOptions {
    /// None: the live metadata. Some(None): the held metadata snapshot.
    /// Some(Some(b)): a metadata snapshot superblock at block b.
    pub metadata_snap: Option<Option<u64>>,
    pub left: Target,
    pub right: Target,
    /// Leave out what is the same on both sides: subtrees both trees share
    /// are then skipped without being read.
    pub changes_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Same,
    Different,
    LeftOnly,
    RightOnly,
}

impl Kind {
    /// The peer's element name.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Same => "same",
            Kind::Different => "different",
            Kind::LeftOnly => "left_only",
            Kind::RightOnly => "right_only",
        }
    }
}

/// `len` consecutive virtual blocks from `begin`, all of one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub kind: Kind,
    pub begin: u64,
    pub len: u64,
    /// Data block of the first block: the left side's for `Same` and
    /// `Different`, the only side's for `LeftOnly` and `RightOnly`.
    pub data: u64,
    /// The right side's data block of the first block (`Different`; equal to
    /// `data` for `Same`; 0 for the others).
    pub right_data: u64,
}

/// What the output starts with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaHeader {
    pub time: u64,
    pub transaction: u64,
    /// The superblock's flags (bit 0: needs_check).
    pub flags: u32,
    pub data_block_size: u32,
    /// 0 for a metadata snapshot (its superblock copy has no space maps).
    pub nr_data_blocks: u64,
    pub left: Target,
    pub right: Target,
}

/// The output of a delta, as events.
pub trait DeltaVisitor {
    fn begin(&mut self, h: &DeltaHeader) -> io::Result<()>;
    /// The runs, in virtual-block order; two consecutive runs are never of
    /// the same kind and contiguous.
    fn run(&mut self, r: &Run) -> io::Result<()>;
    /// With `changes_only`: a stretch of `same` blocks was left out here.
    fn same_skipped(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn end(&mut self) -> io::Result<()>;
}

/// What a delta read: the measure of its sharing awareness.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaStats {
    /// Bottom-level mapping-tree nodes read, both trees, every purpose.
    pub nodes_read: u64,
    /// Of those, nodes read only to list the mappings of shared subtrees
    /// (never compared).
    pub shared_nodes_read: u64,
    /// Subtrees both trees reference (found by block number, not compared).
    pub shared_subtrees: u64,
    /// Leaves read to be compared entry by entry.
    pub leaves_compared: u64,
}

/// Why a delta failed.
#[derive(Debug)]
pub enum DeltaError {
    /// Unreadable or damaged metadata, or failing output.
    Thin(Error),
    /// Thin devices that are not in the pool: (id, option naming it).
    MissingDevices {
        missing: Vec<(u64, &'static str)>,
        /// Looked up in a metadata snapshot.
        in_snapshot: bool,
        /// The devices the pool has.
        present: Vec<u64>,
    },
}

impl fmt::Display for DeltaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeltaError::Thin(e) => e.fmt(f),
            DeltaError::MissingDevices {
                missing,
                in_snapshot,
                present,
            } => {
                let names: Vec<String> = missing
                    .iter()
                    .map(|(id, opt)| format!("{id} ({opt})"))
                    .collect();
                let (what, verb) = if names.len() == 1 {
                    ("device", "is")
                } else {
                    ("devices", "are")
                };
                let place = if *in_snapshot {
                    "the metadata snapshot"
                } else {
                    "the pool"
                };
                write!(
                    f,
                    "thin {what} {} {verb} not in {place}",
                    names.join(" and ")
                )?;
                if present.is_empty() {
                    write!(f, ", which has no thin devices")
                } else {
                    const SHOWN: usize = 16;
                    let ids: Vec<String> =
                        present.iter().take(SHOWN).map(|i| i.to_string()).collect();
                    let more = if present.len() > SHOWN { ", ..." } else { "" };
                    write!(f, " (its devices: {}{more})", ids.join(", "))
                }
            }
        }
    }
}

impl std::error::Error for DeltaError {}

impl From<Error> for DeltaError {
    fn from(e: Error) -> Self {
        DeltaError::Thin(e)
    }
}

impl From<io::Error> for DeltaError {
    fn from(e: io::Error) -> Self {
        DeltaError::Thin(Error::Output(e))
    }
}

/// Compare the two sides `opts` names on `dev`, writing the result to `out`.
pub fn delta(
    dev: &BlockDevice,
    opts: &DeltaOptions,
    out: &mut dyn DeltaVisitor,
) -> Result<DeltaStats, DeltaError> {
    delta_with(dev, opts, out, false)
}

/// [`delta`] for copying what changed (thin_merge `--delta-from`): every
/// run's data blocks continue too, so virtual block `begin + i` maps to data
/// block `data + i` (and, for `Same` and `Different`, to `right_data + i` on
/// the right). Runs are therefore shorter than the peer's; the sharing
/// awareness (shared subtrees skipped with `changes_only`) is the same.
pub fn delta_exact(
    dev: &BlockDevice,
    opts: &DeltaOptions,
    out: &mut dyn DeltaVisitor,
) -> Result<DeltaStats, DeltaError> {
    delta_with(dev, opts, out, true)
}

fn delta_with(
    dev: &BlockDevice,
    opts: &DeltaOptions,
    out: &mut dyn DeltaVisitor,
    exact: bool,
) -> Result<DeltaStats, DeltaError> {
    let (left, right) = (opts.left, opts.right);
    let sb = select_superblock(dev, opts.metadata_snap)?;

    // Device ids are looked up in the top level of the mapping tree (as the
    // peer does; the details tree is not needed).
    let roots: Option<std::collections::BTreeMap<u64, u64>> =
        if matches!(left, Target::Device(_)) || matches!(right, Target::Device(_)) {
            let mut walker = Walker::new(dev);
            let m = walker.read_map::<u64>(sb.mapping_root, |_| {});
            if let Some(i) = m.issues.iter().find(|i| i.fatal) {
                return Err(Error::metadata("mapping tree (top level)", i.error.clone()).into());
            }
            Some(m.entries.into_iter().collect())
        } else {
            None
        };
    let lookup = |t: Target| -> Option<u64> {
        match t {
            Target::Root(b) => Some(b),
            Target::Device(id) => roots.as_ref().and_then(|r| r.get(&id).copied()),
        }
    };
    let (lroot, rroot) = (lookup(left), lookup(right));
    if lroot.is_none() || rroot.is_none() {
        let mut missing = Vec::new();
        match (left, right) {
            (Target::Device(a), Target::Device(b)) if a == b => {
                missing.push((a, "--thin1 and --thin2"));
            }
            _ => {
                if let (Target::Device(id), None) = (left, lroot) {
                    missing.push((id, "--thin1"));
                }
                if let (Target::Device(id), None) = (right, rroot) {
                    missing.push((id, "--thin2"));
                }
            }
        }
        return Err(DeltaError::MissingDevices {
            missing,
            in_snapshot: opts.metadata_snap.is_some(),
            present: roots.map(|r| r.into_keys().collect()).unwrap_or_default(),
        });
    }
    let (lroot, rroot) = (lroot.unwrap(), rroot.unwrap());

    let header = DeltaHeader {
        time: sb.time as u64,
        transaction: sb.transaction_id,
        flags: sb.flags,
        data_block_size: sb.data_block_size,
        nr_data_blocks: sb.data_sm().nr_blocks,
        left,
        right,
    };
    let context = |t: Target, opt: &str| match t {
        Target::Device(id) => format!("mapping tree of device {id}"),
        Target::Root(b) => format!("mapping tree at block {b} ({opt})"),
    };
    out.begin(&header)?;
    let stats = diff_trees_with(
        dev,
        (lroot, context(left, "--root1")),
        (rroot, context(right, "--root2")),
        opts.changes_only,
        exact,
        out,
    )?;
    out.end()?;
    Ok(stats)
}

/// Compare the bottom-level mapping trees at `left.0` and `right.0` (the
/// strings name them in errors), sending the runs to `out`.
#[cfg(test)]
fn diff_trees(
    dev: &BlockDevice,
    left: (u64, String),
    right: (u64, String),
    changes_only: bool,
    out: &mut dyn DeltaVisitor,
) -> Result<DeltaStats, DeltaError> {
    diff_trees_with(dev, left, right, changes_only, false, out)
}

/// [`diff_trees`]; `exact`: runs also need continuing data blocks.
fn diff_trees_with(
    dev: &BlockDevice,
    left: (u64, String),
    right: (u64, String),
    changes_only: bool,
    exact: bool,
    out: &mut dyn DeltaVisitor,
) -> Result<DeltaStats, DeltaError> {
    let mut d = Differ {
        dev,
        changes_only,
        stats: DeltaStats::default(),
        runs: RunBuilder { cur: None, exact },
        lister: Lister::default(),
    };
    d.run(left.0, right.0, left.1, right.1, out)?;
    d.runs.flush(out)?;
    Ok(d.stats)
}

//------------------------------------------------------------------------------
// The walk

/// A subtree not read yet: its root block, height (0 = a leaf), and the key
/// range `[lo, hi)` its parent gives it.
#[derive(Debug, Clone, Copy)]
struct Sub {
    block: u64,
    height: usize,
    lo: u64,
    hi: u64,
}

/// An internal node being walked: its (key, child) pairs and the next child.
struct Frame {
    children: Vec<(u64, u64)>,
    next: usize,
    hi: u64,
    height: usize,
}

/// The head of a tree cursor.
#[derive(Clone, Copy)]
enum Head {
    End,
    Whole(Sub),
    /// The key of the next entry of the leaf being compared.
    Entry(u64),
}

/// A cursor over one mapping tree in key order, descending only on demand.
struct Tree {
    context: String,
    /// The root, until it is expanded or skipped.
    root: Option<Sub>,
    frames: Vec<Frame>,
    spare: Vec<Vec<(u64, u64)>>,
    /// Entries of the leaf being compared, from `pos` on.
    leaf: Vec<(u64, u64)>,
    pos: usize,
}

impl Tree {
    fn new(root: Sub, context: String) -> Tree {
        Tree {
            context,
            root: Some(root),
            frames: Vec::new(),
            spare: Vec::new(),
            leaf: Vec::new(),
            pos: 0,
        }
    }

    fn head(&mut self) -> Head {
        if self.pos < self.leaf.len() {
            return Head::Entry(self.leaf[self.pos].0);
        }
        if let Some(r) = self.root {
            return Head::Whole(r);
        }
        while let Some(f) = self.frames.last() {
            if f.next < f.children.len() {
                return Head::Whole(f.sub(f.next));
            }
            let f = self.frames.pop().unwrap();
            self.spare.push(f.children);
        }
        Head::End
    }

    /// Pass over the whole subtree at the head.
    fn skip(&mut self, n: usize) {
        if self.root.take().is_none() {
            self.frames.last_mut().unwrap().next += n;
        }
    }

    /// The whole subtrees after the head in the same node (the head included).
    fn siblings(&self) -> impl Iterator<Item = Sub> + '_ {
        let f = if self.root.is_some() {
            None
        } else {
            self.frames.last()
        };
        f.into_iter()
            .flat_map(|f| (f.next..f.children.len()).map(move |i| f.sub(i)))
    }

    /// Read the subtree at the head: an internal node becomes a frame, a
    /// leaf the entries to compare.
    fn expand(
        &mut self,
        s: Sub,
        dev: &BlockDevice,
        buf: &mut [u8],
        stats: &mut DeltaStats,
    ) -> Result<(), DeltaError> {
        self.skip(1);
        stats.nodes_read += 1;
        let node = read_node(dev, &s, buf).map_err(|e| self.damaged(e))?;
        if node.is_leaf() {
            stats.leaves_compared += 1;
            self.leaf.clear();
            self.leaf
                .extend((0..node.nr_entries()).map(|i| (node.key(i), node.value::<u64>(i))));
            self.pos = 0;
        } else {
            let mut children = self.spare.pop().unwrap_or_default();
            children.clear();
            children.extend((0..node.nr_entries()).map(|i| (node.key(i), node.child(i))));
            self.frames.push(Frame {
                children,
                next: 0,
                hi: s.hi,
                height: s.height,
            });
        }
        Ok(())
    }

    fn damaged(&self, e: PError) -> DeltaError {
        DeltaError::Thin(Error::metadata(self.context.clone(), e))
    }
}

impl Frame {
    fn sub(&self, i: usize) -> Sub {
        let (lo, block) = self.children[i];
        let hi = self.children.get(i + 1).map_or(self.hi, |c| c.0);
        Sub {
            block,
            height: self.height - 1,
            lo,
            hi,
        }
    }
}

/// Read and validate the node of `s`.
fn read_node<'b>(dev: &BlockDevice, s: &Sub, buf: &'b mut [u8]) -> Result<Node<'b>, PError> {
    dev.read_block(s.block, buf)?;
    check_node(s, buf)
}

/// Validate `data` as the node of `s`: a sound node, a leaf exactly at
/// height 0, keys inside the range the parent gives.
fn check_node<'b>(s: &Sub, data: &'b [u8]) -> Result<Node<'b>, PError> {
    let node = Node::parse(s.block, data, 8)?;
    if node.is_leaf() != (s.height == 0) {
        let msg = if node.is_leaf() {
            format!(
                "leaf found where the tree has an internal node ({} levels above the leaves)",
                s.height
            )
        } else {
            "internal node found where the tree's leaves are".to_string()
        };
        return Err(PError::invalid(s.block, msg));
    }
    if let (Some(first), Some(last)) = (node.first_key(), node.last_key()) {
        if first < s.lo || last >= s.hi {
            return Err(PError::invalid(
                s.block,
                format!(
                    "keys {first}..={last} lie outside the range {}..{} its parent gives",
                    s.lo, s.hi
                ),
            ));
        }
    }
    Ok(node)
}

/// Height of the tree at `root` (0: the root is a leaf), from the chain of
/// first children.
fn tree_height(
    dev: &BlockDevice,
    root: u64,
    buf: &mut [u8],
    stats: &mut DeltaStats,
) -> Result<usize, PError> {
    let mut b = root;
    for h in 0..=MAX_HEIGHT {
        dev.read_block(b, buf)?;
        stats.nodes_read += 1;
        let node = Node::parse(b, buf, 8)?;
        if node.is_leaf() {
            return Ok(h);
        }
        b = node.child(0);
    }
    Err(PError::invalid(
        root,
        format!("tree is deeper than {MAX_HEIGHT} levels (a loop?)"),
    ))
}

struct Differ<'d> {
    dev: &'d BlockDevice,
    changes_only: bool,
    stats: DeltaStats,
    runs: RunBuilder,
    lister: Lister,
}

impl Differ<'_> {
    fn run(
        &mut self,
        lroot: u64,
        rroot: u64,
        lctx: String,
        rctx: String,
        out: &mut dyn DeltaVisitor,
    ) -> Result<(), DeltaError> {
        let dev = self.dev;
        let mut buf = vec![0u8; BLOCK_SIZE];
        let whole = |height| Sub {
            block: 0,
            height,
            lo: 0,
            hi: u64::MAX,
        };
        if lroot == rroot {
            // One tree on both sides: all the same.
            self.stats.shared_subtrees += 1;
            if self.changes_only {
                return Ok(out.same_skipped()?);
            }
            let h = tree_height(dev, lroot, &mut buf, &mut self.stats)
                .map_err(|e| Error::metadata(lctx.clone(), e))?;
            let root = Sub {
                block: lroot,
                ..whole(h)
            };
            return self.list(&[root], Kind::Same, &lctx, out);
        }
        let lh = tree_height(dev, lroot, &mut buf, &mut self.stats)
            .map_err(|e| Error::metadata(lctx.clone(), e))?;
        let rh = tree_height(dev, rroot, &mut buf, &mut self.stats)
            .map_err(|e| Error::metadata(rctx.clone(), e))?;
        let mut l = Tree::new(
            Sub {
                block: lroot,
                ..whole(lh)
            },
            lctx,
        );
        let mut r = Tree::new(
            Sub {
                block: rroot,
                ..whole(rh)
            },
            rctx,
        );
        let mut subs: Vec<Sub> = Vec::new();

        loop {
            match (l.head(), r.head()) {
                (Head::End, Head::End) => return Ok(()),
                (Head::End, _) => return self.drain(&mut r, Kind::RightOnly, out),
                (_, Head::End) => return self.drain(&mut l, Kind::LeftOnly, out),
                (Head::Whole(a), Head::Whole(b)) if a.block == b.block => {
                    // Shared: this subtree and, often, the siblings after it.
                    subs.clear();
                    for (x, y) in l.siblings().zip(r.siblings()) {
                        if x.block != y.block || x.height != y.height {
                            break;
                        }
                        subs.push(Sub {
                            lo: x.lo.max(y.lo),
                            hi: x.hi.min(y.hi),
                            ..x
                        });
                    }
                    if subs.is_empty() {
                        // A root on either side: just this one.
                        subs.push(Sub {
                            lo: a.lo.max(b.lo),
                            hi: a.hi.min(b.hi),
                            ..a
                        });
                    }
                    l.skip(subs.len());
                    r.skip(subs.len());
                    self.stats.shared_subtrees += subs.len() as u64;
                    if self.changes_only {
                        self.runs.flush(out)?;
                        out.same_skipped()?;
                    } else {
                        let ctx = l.context.clone();
                        self.list(&subs, Kind::Same, &ctx, out)?;
                    }
                }
                (Head::Entry(_), Head::Entry(_)) => self.merge_leaves(&mut l, &mut r, out)?,
                (Head::Entry(k), Head::Whole(b)) => {
                    if k < b.lo {
                        self.only_below(&mut l, Kind::LeftOnly, b.lo, out)?;
                    } else {
                        r.expand(b, dev, &mut buf, &mut self.stats)?;
                    }
                }
                (Head::Whole(a), Head::Entry(k)) => {
                    if k < a.lo {
                        self.only_below(&mut r, Kind::RightOnly, a.lo, out)?;
                    } else {
                        l.expand(a, dev, &mut buf, &mut self.stats)?;
                    }
                }
                (Head::Whole(a), Head::Whole(b)) => {
                    if a.hi <= b.lo {
                        // Wholly before anything left on the right.
                        l.skip(1);
                        let ctx = l.context.clone();
                        self.list(&[a], Kind::LeftOnly, &ctx, out)?;
                    } else if b.hi <= a.lo {
                        r.skip(1);
                        let ctx = r.context.clone();
                        self.list(&[b], Kind::RightOnly, &ctx, out)?;
                    } else if a.lo < b.lo || (a.lo == b.lo && a.height >= b.height) {
                        l.expand(a, dev, &mut buf, &mut self.stats)?;
                    } else {
                        r.expand(b, dev, &mut buf, &mut self.stats)?;
                    }
                }
            }
        }
    }

    /// Compare the two leaves being read, entry by entry, until one ends.
    fn merge_leaves(
        &mut self,
        l: &mut Tree,
        r: &mut Tree,
        out: &mut dyn DeltaVisitor,
    ) -> Result<(), DeltaError> {
        let a = &l.leaf[l.pos..];
        let b = &r.leaf[r.pos..];
        let (mut i, mut j) = (0, 0);
        while i < a.len() && j < b.len() {
            let (kl, vl) = a[i];
            let (kr, vr) = b[j];
            if kl < kr {
                self.runs.push(Kind::LeftOnly, kl, 1, vl >> 24, 0, out)?;
                i += 1;
            } else if kr < kl {
                self.runs.push(Kind::RightOnly, kr, 1, vr >> 24, 0, out)?;
                j += 1;
            } else {
                let (dl, dr) = (vl >> 24, vr >> 24);
                let kind = if dl == dr {
                    Kind::Same
                } else {
                    Kind::Different
                };
                self.runs.push(kind, kl, 1, dl, dr, out)?;
                i += 1;
                j += 1;
            }
        }
        l.pos += i;
        r.pos += j;
        Ok(())
    }

    /// Entries of the leaf being read on `t` below `bound`: nothing on the
    /// other side can match them.
    fn only_below(
        &mut self,
        t: &mut Tree,
        kind: Kind,
        bound: u64,
        out: &mut dyn DeltaVisitor,
    ) -> Result<(), DeltaError> {
        while t.pos < t.leaf.len() && t.leaf[t.pos].0 < bound {
            let (k, v) = t.leaf[t.pos];
            self.runs.push(kind, k, 1, v >> 24, 0, out)?;
            t.pos += 1;
        }
        Ok(())
    }

    /// Everything left on `t` (the other side has ended).
    fn drain(
        &mut self,
        t: &mut Tree,
        kind: Kind,
        out: &mut dyn DeltaVisitor,
    ) -> Result<(), DeltaError> {
        let mut subs = Vec::new();
        loop {
            match t.head() {
                Head::End => return Ok(()),
                Head::Entry(_) => self.only_below(t, kind, u64::MAX, out)?,
                Head::Whole(_) => {
                    subs.clear();
                    subs.extend(t.siblings());
                    if subs.is_empty() {
                        subs.push(t.root.unwrap());
                    }
                    t.skip(subs.len());
                    let ctx = t.context.clone();
                    self.list(&subs, kind, &ctx, out)?;
                }
            }
        }
    }

    /// List every mapping of the subtrees `subs` (consecutive, in key
    /// order) as `kind`, reading their leaves in batches.
    fn list(
        &mut self,
        subs: &[Sub],
        kind: Kind,
        context: &str,
        out: &mut dyn DeltaVisitor,
    ) -> Result<(), DeltaError> {
        let shared = kind == Kind::Same;
        let dev = self.dev;
        let Differ {
            stats,
            runs,
            lister,
            ..
        } = self;
        let damaged = |e: PError| DeltaError::Thin(Error::metadata(context.to_string(), e));
        let mut node_buf = std::mem::take(&mut lister.node_buf);
        node_buf.resize(BLOCK_SIZE, 0);
        let count = |stats: &mut DeltaStats, n: u64| {
            stats.nodes_read += n;
            if shared {
                stats.shared_nodes_read += n;
            }
        };
        let r = (|| {
            for &s in subs {
                lister.stack.push(s);
                while let Some(t) = lister.stack.pop() {
                    if t.height == 0 {
                        lister.batch.push(t);
                        if lister.batch.len() == BATCH {
                            count(stats, lister.batch.len() as u64);
                            lister.flush(dev, kind, runs, out).map_err(|e| match e {
                                Flush::Node(e) => damaged(e),
                                Flush::Out(e) => e.into(),
                            })?;
                        }
                        continue;
                    }
                    count(stats, 1);
                    let node = read_node(dev, &t, &mut node_buf).map_err(damaged)?;
                    // Children pushed last-first so they pop in key order.
                    let n = node.nr_entries();
                    for i in (0..n).rev() {
                        lister.stack.push(Sub {
                            block: node.child(i),
                            height: t.height - 1,
                            lo: node.key(i),
                            hi: if i + 1 < n { node.key(i + 1) } else { t.hi },
                        });
                    }
                }
            }
            count(stats, lister.batch.len() as u64);
            lister.flush(dev, kind, runs, out).map_err(|e| match e {
                Flush::Node(e) => damaged(e),
                Flush::Out(e) => e.into(),
            })
        })();
        lister.node_buf = node_buf;
        if r.is_err() {
            lister.stack.clear();
            lister.batch.clear();
        }
        r
    }
}

/// Batched reading of the leaves of listed subtrees.
#[derive(Default)]
struct Lister {
    stack: Vec<Sub>,
    batch: Vec<Sub>,
    node_buf: Vec<u8>,
    data: Vec<u8>,
    order: Vec<(u64, usize)>,
}

enum Flush {
    Node(PError),
    Out(io::Error),
}

impl Lister {
    /// Read the leaves in `batch` (runs of consecutive blocks in one read
    /// each) and push their entries, in batch order, as `kind`.
    fn flush(
        &mut self,
        dev: &BlockDevice,
        kind: Kind,
        runs: &mut RunBuilder,
        out: &mut dyn DeltaVisitor,
    ) -> Result<(), Flush> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let n = self.batch.len();
        self.order.clear();
        self.order
            .extend(self.batch.iter().enumerate().map(|(i, s)| (s.block, i)));
        self.order.sort_unstable();
        if self.data.len() < n * BLOCK_SIZE {
            self.data.resize(n * BLOCK_SIZE, 0);
        }
        // Slot of batch entry i: its rank in block order.
        let mut slot = vec![0usize; n];
        let mut i = 0;
        while i < n {
            let mut j = i + 1;
            while j < n && self.order[j].0 == self.order[j - 1].0 + 1 {
                j += 1;
            }
            let first = self.order[i].0;
            let area = &mut self.data[i * BLOCK_SIZE..j * BLOCK_SIZE];
            if dev.read_run(first, area).is_err() {
                // Name the first block that cannot be read.
                for k in i..j {
                    let b = self.order[k].0;
                    dev.read_block(b, &mut self.data[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE])
                        .map_err(Flush::Node)?;
                }
            }
            for k in i..j {
                slot[self.order[k].1] = k;
            }
            i = j;
        }
        let r = (|| {
            for (i, s) in self.batch.iter().enumerate() {
                let k = slot[i];
                let data = &self.data[k * BLOCK_SIZE..(k + 1) * BLOCK_SIZE];
                let node = check_node(s, data).map_err(Flush::Node)?;
                push_leaf(&node, kind, runs, out).map_err(Flush::Out)?;
            }
            Ok(())
        })();
        self.batch.clear();
        r
    }
}

/// Push every entry of `leaf` as `kind`, a stretch of consecutive keys at a time.
fn push_leaf(
    leaf: &Node,
    kind: Kind,
    runs: &mut RunBuilder,
    out: &mut dyn DeltaVisitor,
) -> io::Result<()> {
    let n = leaf.nr_entries();
    if n == 0 {
        return Ok(());
    }
    let same = |d: u64| if kind == Kind::Same { d } else { 0 };
    if runs.exact {
        // One entry at a time: the builder joins them where the data continues.
        for i in 0..n {
            let d = leaf.value::<u64>(i) >> 24;
            runs.push(kind, leaf.key(i), 1, d, same(d), out)?;
        }
        return Ok(());
    }
    let first = leaf.key(0);
    if leaf.key(n - 1) - first == (n - 1) as u64 {
        // Dense (keys strictly increase): one stretch.
        let d = leaf.value::<u64>(0) >> 24;
        return runs.push(kind, first, n as u64, d, same(d), out);
    }
    let mut i = 0;
    while i < n {
        let k0 = leaf.key(i);
        let mut j = i + 1;
        while j < n && leaf.key(j) == k0 + (j - i) as u64 {
            j += 1;
        }
        let d = leaf.value::<u64>(i) >> 24;
        runs.push(kind, k0, (j - i) as u64, d, same(d), out)?;
        i = j;
    }
    Ok(())
}

/// Merges blocks into runs: same kind and consecutive virtual blocks (the
/// data blocks need not continue, unless `exact`).
#[derive(Default)]
struct RunBuilder {
    cur: Option<Run>,
    /// Join only where the data blocks continue too (both sides' for `Same`
    /// and `Different`).
    exact: bool,
}

impl RunBuilder {
    #[inline]
    fn push(
        &mut self,
        kind: Kind,
        begin: u64,
        len: u64,
        data: u64,
        right_data: u64,
        out: &mut dyn DeltaVisitor,
    ) -> io::Result<()> {
        if let Some(c) = &mut self.cur {
            let data_continues = !self.exact
                || (c.data + c.len == data
                    && (!matches!(kind, Kind::Same | Kind::Different)
                        || c.right_data + c.len == right_data));
            if c.kind == kind && c.begin + c.len == begin && data_continues {
                c.len += len;
                return Ok(());
            }
            out.run(c)?;
        }
        self.cur = Some(Run {
            kind,
            begin,
            len,
            data,
            right_data,
        });
        Ok(())
    }

    fn flush(&mut self, out: &mut dyn DeltaVisitor) -> io::Result<()> {
        match self.cur.take() {
            Some(c) => out.run(&c),
            None => Ok(()),
        }
    }
}

//------------------------------------------------------------------------------
// Writers

/// The peer's XML, byte for byte: two-space indent, one element a line, no
/// declaration and no trailing newline. Without `verbose` each run is an
/// empty element `<KIND begin=".." length=".."/>`; with it, consecutive
/// runs of one kind are grouped in a `<KIND>` element as `<range .../>`
/// elements that also give the data blocks. With `changes_only`, `same`
/// runs are left out (and so are their groups).
pub struct XmlDeltaWriter<W: Write> {
    x: XmlLines<W>,
    verbose: bool,
    changes_only: bool,
    group: Option<Kind>,
}

impl<W: Write> XmlDeltaWriter<W> {
    pub fn new(w: W, verbose: bool, changes_only: bool) -> Self {
        XmlDeltaWriter {
            x: XmlLines::new(w),
            verbose,
            changes_only,
            group: None,
        }
    }

    pub fn into_inner(self) -> W {
        self.x.into_inner()
    }

    fn close_group(&mut self) -> io::Result<()> {
        if let Some(g) = self.group.take() {
            self.x.close(g.name())?;
        }
        Ok(())
    }
}

impl<W: Write> DeltaVisitor for XmlDeltaWriter<W> {
    fn begin(&mut self, h: &DeltaHeader) -> io::Result<()> {
        self.x.line()?;
        self.x.w.write_all(b"<superblock uuid=\"\"")?;
        self.x.attr("time", h.time)?;
        self.x.attr("transaction", h.transaction)?;
        if h.flags & NEEDS_CHECK_FLAG != 0 {
            self.x.attr("flags", 1)?;
        }
        self.x.attr("data_block_size", h.data_block_size as u64)?;
        self.x.attr("nr_data_blocks", h.nr_data_blocks)?;
        self.x.w.write_all(b">")?;
        self.x.depth += 1;
        self.x.line()?;
        self.x.w.write_all(b"<diff")?;
        match h.left {
            Target::Device(id) => self.x.attr("left", id)?,
            Target::Root(b) => self.x.attr("left_root", b)?,
        }
        match h.right {
            Target::Device(id) => self.x.attr("right", id)?,
            Target::Root(b) => self.x.attr("right_root", b)?,
        }
        self.x.w.write_all(b">")?;
        self.x.depth += 1;
        Ok(())
    }

    fn run(&mut self, r: &Run) -> io::Result<()> {
        if self.changes_only && r.kind == Kind::Same {
            return self.same_skipped();
        }
        if !self.verbose {
            self.x.line()?;
            self.x.w.write_all(b"<")?;
            self.x.w.write_all(r.kind.name().as_bytes())?;
            self.x.attr("begin", r.begin)?;
            self.x.attr("length", r.len)?;
            return self.x.w.write_all(b"/>");
        }
        if self.group != Some(r.kind) {
            self.close_group()?;
            self.x.line()?;
            self.x.w.write_all(b"<")?;
            self.x.w.write_all(r.kind.name().as_bytes())?;
            self.x.w.write_all(b">")?;
            self.x.depth += 1;
            self.group = Some(r.kind);
        }
        self.x.line()?;
        self.x.w.write_all(b"<range")?;
        self.x.attr("begin", r.begin)?;
        if r.kind == Kind::Different {
            self.x.attr("left_data_begin", r.data)?;
            self.x.attr("right_data_begin", r.right_data)?;
        } else {
            self.x.attr("data_begin", r.data)?;
        }
        self.x.attr("length", r.len)?;
        self.x.w.write_all(b"/>")
    }

    fn same_skipped(&mut self) -> io::Result<()> {
        self.close_group()
    }

    fn end(&mut self) -> io::Result<()> {
        self.close_group()?;
        self.x.close("diff")?;
        self.x.close("superblock")?;
        self.x.w.flush()
    }
}

/// JSON (thinmeta's own; schema in man/thin_delta.8): one document,
/// streamed, with the same content as the XML:
/// `{"superblock":{..},"diff":{"left":..,"right":..,"entries":[{"kind":..,"begin":..,"length":..},..]}}`;
/// `verbose` adds the data blocks to each entry.
pub struct JsonDeltaWriter<W: Write> {
    w: W,
    verbose: bool,
    changes_only: bool,
    first: bool,
}

impl<W: Write> JsonDeltaWriter<W> {
    pub fn new(w: W, verbose: bool, changes_only: bool) -> Self {
        JsonDeltaWriter {
            w,
            verbose,
            changes_only,
            first: true,
        }
    }

    pub fn into_inner(self) -> W {
        self.w
    }

    fn num(&mut self, key: &str, v: u64) -> io::Result<()> {
        let mut b = itoa::Buffer::new();
        self.w.write_all(b",\"")?;
        self.w.write_all(key.as_bytes())?;
        self.w.write_all(b"\":")?;
        self.w.write_all(b.format(v).as_bytes())
    }
}

impl<W: Write> DeltaVisitor for JsonDeltaWriter<W> {
    fn begin(&mut self, h: &DeltaHeader) -> io::Result<()> {
        self.w.write_all(b"{\"superblock\":{\"uuid\":\"\"")?;
        self.num("time", h.time)?;
        self.num("transaction", h.transaction)?;
        self.num("flags", h.flags as u64)?;
        self.num("data_block_size", h.data_block_size as u64)?;
        self.num("nr_data_blocks", h.nr_data_blocks)?;
        self.w.write_all(b"},\n\"diff\":{\"changes_only\":")?;
        self.w
            .write_all(if self.changes_only { b"true" } else { b"false" })?;
        match h.left {
            Target::Device(id) => self.num("left", id)?,
            Target::Root(b) => self.num("left_root", b)?,
        }
        match h.right {
            Target::Device(id) => self.num("right", id)?,
            Target::Root(b) => self.num("right_root", b)?,
        }
        self.w.write_all(b",\"entries\":[")
    }

    fn run(&mut self, r: &Run) -> io::Result<()> {
        if self.changes_only && r.kind == Kind::Same {
            return Ok(());
        }
        self.w.write_all(if self.first { b"\n" } else { b",\n" })?;
        self.first = false;
        self.w.write_all(b"{\"kind\":\"")?;
        self.w.write_all(r.kind.name().as_bytes())?;
        self.w.write_all(b"\"")?;
        self.num("begin", r.begin)?;
        self.num("length", r.len)?;
        if self.verbose {
            if r.kind == Kind::Different {
                self.num("left_data_begin", r.data)?;
                self.num("right_data_begin", r.right_data)?;
            } else {
                self.num("data_begin", r.data)?;
            }
        }
        self.w.write_all(b"}")
    }

    fn end(&mut self) -> io::Result<()> {
        self.w.write_all(b"\n]}}\n")?;
        self.w.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn header() -> DeltaHeader {
        DeltaHeader {
            time: 1,
            transaction: 2,
            flags: 0,
            data_block_size: 128,
            nr_data_blocks: 1024,
            left: Target::Device(1),
            right: Target::Device(2),
        }
    }

    fn runs() -> Vec<Run> {
        let r = |kind, begin, len, data, right_data| Run {
            kind,
            begin,
            len,
            data,
            right_data,
        };
        vec![
            r(Kind::Same, 0, 3, 10, 10),
            r(Kind::Same, 4, 1, 20, 20),
            r(Kind::Different, 5, 2, 30, 40),
            r(Kind::LeftOnly, 9, 1, 50, 0),
        ]
    }

    fn write(w: &mut dyn DeltaVisitor) {
        w.begin(&header()).unwrap();
        for r in runs() {
            w.run(&r).unwrap();
        }
        w.end().unwrap();
    }

    #[test]
    fn xml_matches_the_peer_layout() {
        let mut w = XmlDeltaWriter::new(Vec::new(), false, false);
        write(&mut w);
        assert_eq!(
            String::from_utf8(w.into_inner()).unwrap(),
            "<superblock uuid=\"\" time=\"1\" transaction=\"2\" data_block_size=\"128\" nr_data_blocks=\"1024\">\n  <diff left=\"1\" right=\"2\">\n    <same begin=\"0\" length=\"3\"/>\n    <same begin=\"4\" length=\"1\"/>\n    <different begin=\"5\" length=\"2\"/>\n    <left_only begin=\"9\" length=\"1\"/>\n  </diff>\n</superblock>"
        );
        let mut w = XmlDeltaWriter::new(Vec::new(), true, false);
        write(&mut w);
        assert_eq!(
            String::from_utf8(w.into_inner()).unwrap(),
            "<superblock uuid=\"\" time=\"1\" transaction=\"2\" data_block_size=\"128\" nr_data_blocks=\"1024\">\n  <diff left=\"1\" right=\"2\">\n    <same>\n      <range begin=\"0\" data_begin=\"10\" length=\"3\"/>\n      <range begin=\"4\" data_begin=\"20\" length=\"1\"/>\n    </same>\n    <different>\n      <range begin=\"5\" left_data_begin=\"30\" right_data_begin=\"40\" length=\"2\"/>\n    </different>\n    <left_only>\n      <range begin=\"9\" data_begin=\"50\" length=\"1\"/>\n    </left_only>\n  </diff>\n</superblock>"
        );
    }

    #[test]
    fn an_empty_diff_closes_on_its_own_line() {
        let mut w = XmlDeltaWriter::new(Vec::new(), true, false);
        let mut h = header();
        h.flags = 1;
        h.left = Target::Root(7);
        w.begin(&h).unwrap();
        w.end().unwrap();
        assert_eq!(
            String::from_utf8(w.into_inner()).unwrap(),
            "<superblock uuid=\"\" time=\"1\" transaction=\"2\" flags=\"1\" data_block_size=\"128\" nr_data_blocks=\"1024\">\n  <diff left_root=\"7\" right=\"2\">\n  </diff>\n</superblock>"
        );
    }

    #[test]
    fn changes_only_drops_same_and_its_groups() {
        let mut w = XmlDeltaWriter::new(Vec::new(), true, true);
        w.begin(&header()).unwrap();
        let r = runs();
        w.run(&r[2]).unwrap();
        w.same_skipped().unwrap();
        w.run(&Run { begin: 8, ..r[2] }).unwrap();
        w.end().unwrap();
        let s = String::from_utf8(w.into_inner()).unwrap();
        assert_eq!(s.matches("<different>").count(), 2);
        assert!(!s.contains("same"));
    }

    #[test]
    fn json_is_one_document() {
        let mut w = JsonDeltaWriter::new(Vec::new(), true, false);
        write(&mut w);
        let s = String::from_utf8(w.into_inner()).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["diff"]["left"], 1);
        assert_eq!(v["diff"]["entries"][2]["kind"], "different");
        assert_eq!(v["diff"]["entries"][2]["right_data_begin"], 40);
        assert_eq!(v["superblock"]["nr_data_blocks"], 1024);
    }

    /// Collects the runs (and counts the skipped stretches).
    #[derive(Default)]
    struct Collect {
        runs: Vec<Run>,
        skipped: usize,
    }
    impl DeltaVisitor for Collect {
        fn begin(&mut self, _: &DeltaHeader) -> io::Result<()> {
            Ok(())
        }
        fn run(&mut self, r: &Run) -> io::Result<()> {
            self.runs.push(*r);
            Ok(())
        }
        fn same_skipped(&mut self) -> io::Result<()> {
            self.skipped += 1;
            Ok(())
        }
        fn end(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    //--------------------------------------------------------------------------
    // Random trees with copy-on-write sharing, against a block-by-block diff.

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
    }

    /// An in-memory mapping tree; a block number names one content.
    #[derive(Clone)]
    enum T {
        Leaf(u64, Vec<(u64, u64)>),
        Node(u64, Vec<(u64, T)>),
    }

    impl T {
        fn block(&self) -> u64 {
            match self {
                T::Leaf(b, _) | T::Node(b, _) => *b,
            }
        }
        fn min(&self) -> u64 {
            match self {
                T::Leaf(_, e) => e[0].0,
                T::Node(_, c) => c[0].0,
            }
        }
        fn max(&self) -> u64 {
            match self {
                T::Leaf(_, e) => e.last().unwrap().0,
                T::Node(_, c) => c.last().unwrap().1.max(),
            }
        }
        fn height(&self) -> usize {
            match self {
                T::Leaf(..) => 0,
                T::Node(_, c) => 1 + c[0].1.height(),
            }
        }
        fn entries(&self, out: &mut BTreeMap<u64, u64>) {
            match self {
                T::Leaf(_, e) => out.extend(e.iter().copied()),
                T::Node(_, c) => c.iter().for_each(|(_, t)| t.entries(out)),
            }
        }
        fn write(&self, img: &mut BTreeMap<u64, Vec<u8>>) {
            use crate::pdata::btree::testutil::build;
            let (b, leaf, keys, vals): (u64, bool, Vec<u64>, Vec<u64>) = match self {
                T::Leaf(b, e) => (
                    *b,
                    true,
                    e.iter().map(|x| x.0).collect(),
                    e.iter().map(|x| (x.1 << 24) | 7).collect(),
                ),
                T::Node(b, c) => {
                    c.iter().for_each(|(_, t)| t.write(img));
                    (
                        *b,
                        false,
                        c.iter().map(|x| x.0).collect(),
                        c.iter().map(|x| x.1.block()).collect(),
                    )
                }
            };
            let vb: Vec<[u8; 8]> = vals.iter().map(|v| v.to_le_bytes()).collect();
            let refs: Vec<&[u8]> = vb.iter().map(|v| &v[..]).collect();
            img.insert(b, build(b, leaf, &keys, &refs, 8));
        }
    }

    struct Gen {
        rng: Rng,
        next_block: u64,
    }

    impl Gen {
        fn block(&mut self) -> u64 {
            self.next_block += 1;
            self.next_block
        }

        /// `n` entries from key `start` on: mostly runs, some holes, data
        /// mostly consecutive.
        fn entries(&mut self, start: u64, n: usize) -> Vec<(u64, u64)> {
            let (mut k, mut d) = (start, self.rng.below(1000));
            (0..n)
                .map(|_| {
                    k += if self.rng.below(4) == 0 {
                        1 + self.rng.below(5)
                    } else {
                        1
                    };
                    d = if self.rng.below(3) == 0 {
                        self.rng.below(1000)
                    } else {
                        d + 1
                    };
                    (k, d)
                })
                .collect()
        }

        /// A tree over `e` of exactly `height` (>= 1 leaf level), with
        /// parent keys at or (stale) below their child's first key.
        fn tree(&mut self, e: &[(u64, u64)], height: usize, floor: u64) -> T {
            let mut level: Vec<T> = Vec::new();
            let mut i = 0;
            while i < e.len() {
                let n = (1 + self.rng.below(6) as usize).min(e.len() - i);
                level.push(T::Leaf(self.block(), e[i..i + n].to_vec()));
                i += n;
            }
            for _ in 0..height {
                let mut up = Vec::new();
                let mut prev_max = floor;
                let mut j = 0;
                while j < level.len() {
                    let n = (2 + self.rng.below(3) as usize).min(level.len() - j);
                    let children: Vec<(u64, T)> = level[j..j + n]
                        .iter()
                        .map(|t| {
                            let gap = t.min() - prev_max;
                            let key = t.min() - self.rng.below(gap);
                            prev_max = t.max() + 1;
                            (key, t.clone())
                        })
                        .collect();
                    up.push(T::Node(self.block(), children));
                    j += n;
                }
                level = up;
            }
            while level.len() > 1 {
                // Too wide for the height asked: one more level.
                let children = level.into_iter().map(|t| (t.min(), t)).collect();
                level = vec![T::Node(self.block(), children)];
            }
            level.pop().unwrap()
        }

        /// Copy-on-write changes to some leaves (keys changed only inside
        /// `[lo, hi)`): changed nodes get new blocks, the rest is shared.
        fn mutate(&mut self, t: &T, lo: u64, hi: u64, p: u64) -> T {
            match t {
                T::Leaf(_, e) => {
                    if self.rng.below(100) >= p {
                        return t.clone();
                    }
                    let mut m: BTreeMap<u64, u64> = e.iter().copied().collect();
                    for _ in 0..1 + self.rng.below(4) {
                        let k = lo + self.rng.below((hi - lo).min(e.len() as u64 * 3));
                        match self.rng.below(3) {
                            0 if m.len() > 1 => {
                                m.remove(&k);
                            }
                            _ => {
                                m.insert(k, self.rng.below(1000));
                            }
                        }
                    }
                    T::Leaf(self.block(), m.into_iter().collect())
                }
                T::Node(b, c) => {
                    let mut changed = false;
                    let nc: Vec<(u64, T)> = c
                        .iter()
                        .enumerate()
                        .map(|(i, (k, ch))| {
                            let h = c.get(i + 1).map_or(hi, |x| x.0);
                            let n = self.mutate(ch, *k, h, p);
                            changed |= n.block() != ch.block();
                            (*k, n)
                        })
                        .collect();
                    if changed {
                        T::Node(self.block(), nc)
                    } else {
                        T::Node(*b, nc)
                    }
                }
            }
        }
    }

    fn expected(a: &T, b: &T) -> Vec<Run> {
        let (mut l, mut r) = (BTreeMap::new(), BTreeMap::new());
        a.entries(&mut l);
        b.entries(&mut r);
        let mut keys: Vec<u64> = l.keys().chain(r.keys()).copied().collect();
        keys.sort_unstable();
        keys.dedup();
        let mut out: Vec<Run> = Vec::new();
        for k in keys {
            let (kind, data, right_data) = match (l.get(&k), r.get(&k)) {
                (Some(&x), Some(&y)) if x == y => (Kind::Same, x, y),
                (Some(&x), Some(&y)) => (Kind::Different, x, y),
                (Some(&x), None) => (Kind::LeftOnly, x, 0),
                (None, Some(&y)) => (Kind::RightOnly, y, 0),
                (None, None) => unreachable!(),
            };
            match out.last_mut() {
                Some(last) if last.kind == kind && last.begin + last.len == k => last.len += 1,
                _ => out.push(Run {
                    kind,
                    begin: k,
                    len: 1,
                    data,
                    right_data,
                }),
            }
        }
        out
    }

    fn image(trees: &[&T]) -> (tempfile::NamedTempFile, BlockDevice) {
        let mut img = BTreeMap::new();
        for t in trees {
            t.write(&mut img);
        }
        let last = *img.keys().last().unwrap();
        let mut bytes = vec![0u8; (last as usize + 1) * BLOCK_SIZE];
        for (b, data) in img {
            bytes[b as usize * BLOCK_SIZE..(b as usize + 1) * BLOCK_SIZE].copy_from_slice(&data);
        }
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(&bytes).unwrap();
        f.flush().unwrap();
        let dev = BlockDevice::open(f.path(), crate::pdata::io::OpenMode::ReadOnly).unwrap();
        (f, dev)
    }

    fn check(dev: &BlockDevice, a: &T, b: &T, what: &str) -> (DeltaStats, DeltaStats) {
        let want = expected(a, b);
        let full = {
            let mut c = Collect::default();
            let s = diff_trees(
                dev,
                (a.block(), "left".into()),
                (b.block(), "right".into()),
                false,
                &mut c,
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(c.runs, want, "{what}");
            s
        };
        let changes = {
            let mut c = Collect::default();
            let s = diff_trees(
                dev,
                (a.block(), "left".into()),
                (b.block(), "right".into()),
                true,
                &mut c,
            )
            .unwrap_or_else(|e| panic!("{what}: {e}"));
            let not_same = |v: &[Run]| -> Vec<Run> {
                v.iter().filter(|r| r.kind != Kind::Same).copied().collect()
            };
            assert_eq!(not_same(&c.runs), not_same(&want), "{what} (changes only)");
            assert_eq!(s.shared_nodes_read, 0);
            s
        };
        (full, changes)
    }

    #[test]
    fn random_shared_trees_diff_like_a_block_by_block_comparison() {
        for seed in 1..=200u64 {
            let mut g = Gen {
                rng: Rng((seed * 0x9e37_79b9_7f4a_7c15) | 1),
                next_block: 0,
            };
            let n = 1 + g.rng.below(400) as usize;
            let start = g.rng.below(50);
            let e = g.entries(start, n);
            let height = g.rng.below(4) as usize;
            let a = g.tree(&e, height, 0);
            let p = [0, 2, 10, 50, 100][g.rng.below(5) as usize];
            let b = g.mutate(&a, 0, u64::MAX / 2, p);
            // A taller tree holding `b` as its first subtree, more after it.
            let m = 1 + g.rng.below(50) as usize;
            let extra_e = g.entries(a.max().max(b.max()) + 10, m);
            let extra = g.tree(&extra_e, b.height(), b.max() + 1);
            let taller = T::Node(
                g.block(),
                vec![(b.min(), b.clone()), (extra.min(), extra.clone())],
            );
            let taller_ok = extra.height() == b.height();
            // An unrelated tree over partly the same keys.
            let (start, m) = (g.rng.below(100), 1 + g.rng.below(300) as usize);
            let ce = g.entries(start, m);
            let c = g.tree(&ce, 1, 0);
            let (_f, dev) = image(&[&a, &b, &taller, &c]);
            let what = format!("seed {seed}: {n} entries, height {height}, p {p}");
            for (x, y, w) in [
                (&a, &b, "a/b"),
                (&b, &c, "b/c"),
                (&b, &a, "b/a"),
                (&a, &a, "a/a"),
                (&a, &taller, "a/taller"),
                (&taller, &b, "taller/b"),
                (&a, &c, "a/c"),
                (&c, &taller, "c/taller"),
            ] {
                if !taller_ok && w.contains("taller") {
                    continue;
                }
                let (_, changes) = check(&dev, x, y, &format!("{what}, {w}"));
                if w == "taller/b" || w == "a/a" {
                    // Found at its own level, never compared.
                    assert!(changes.shared_subtrees >= 1, "{what}, {w}: {changes:?}");
                    assert_eq!(changes.leaves_compared, 0, "{what}, {w}: {changes:?}");
                }
            }
        }
    }

    #[test]
    fn shared_subtrees_cost_nothing_with_changes_only() {
        let mut g = Gen {
            rng: Rng(77),
            next_block: 0,
        };
        let e = g.entries(0, 3000);
        let a = g.tree(&e, 3, 0);
        // One leaf changed.
        let mut b = a.clone();
        let mut path = &mut b;
        let mut depth = 0;
        while let T::Node(blk, c) = path {
            *blk = 100_000 + depth;
            depth += 1;
            let i = c.len() / 2;
            path = &mut c[i].1;
        }
        if let T::Leaf(blk, e) = path {
            *blk = 200_000;
            e[0].1 += 1;
        }
        let (_f, dev) = image(&[&a, &b]);
        let (full, changes) = check(&dev, &a, &b, "one leaf changed");
        // The chains of first children (for the heights) and the two
        // changed paths; no shared node.
        assert!(changes.nodes_read <= 4 * (depth + 1), "{changes:?}");
        assert_eq!(changes.leaves_compared, 2);
        assert!(full.shared_nodes_read > 400, "{full:?}");
    }

    #[test]
    fn runs_merge_by_kind_and_contiguity_only() {
        struct Collect(Vec<Run>);
        impl DeltaVisitor for Collect {
            fn begin(&mut self, _: &DeltaHeader) -> io::Result<()> {
                Ok(())
            }
            fn run(&mut self, r: &Run) -> io::Result<()> {
                self.0.push(*r);
                Ok(())
            }
            fn end(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut c = Collect(Vec::new());
        let mut b = RunBuilder::default();
        b.push(Kind::Same, 0, 1, 10, 10, &mut c).unwrap();
        b.push(Kind::Same, 1, 2, 99, 99, &mut c).unwrap(); // data jumps: still one run
        b.push(Kind::Different, 3, 1, 5, 6, &mut c).unwrap();
        b.push(Kind::Different, 5, 1, 5, 6, &mut c).unwrap(); // gap
        b.flush(&mut c).unwrap();
        assert_eq!(c.0.len(), 3);
        assert_eq!((c.0[0].begin, c.0[0].len, c.0[0].data), (0, 3, 10));
        assert_eq!((c.0[2].begin, c.0[2].len), (5, 1));
    }

    #[test]
    fn exact_runs_need_continuing_data() {
        struct Collect(Vec<Run>);
        impl DeltaVisitor for Collect {
            fn begin(&mut self, _: &DeltaHeader) -> io::Result<()> {
                Ok(())
            }
            fn run(&mut self, r: &Run) -> io::Result<()> {
                self.0.push(*r);
                Ok(())
            }
            fn end(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut c = Collect(Vec::new());
        let mut b = RunBuilder {
            cur: None,
            exact: true,
        };
        b.push(Kind::RightOnly, 0, 1, 10, 0, &mut c).unwrap();
        b.push(Kind::RightOnly, 1, 1, 11, 0, &mut c).unwrap(); // continues
        b.push(Kind::RightOnly, 2, 1, 99, 0, &mut c).unwrap(); // data jumps
        b.push(Kind::Different, 3, 1, 5, 7, &mut c).unwrap();
        b.push(Kind::Different, 4, 1, 6, 9, &mut c).unwrap(); // right side jumps
        b.flush(&mut c).unwrap();
        let got: Vec<_> = c.0.iter().map(|r| (r.begin, r.len, r.data)).collect();
        assert_eq!(got, vec![(0, 2, 10), (2, 1, 99), (3, 1, 5), (4, 1, 6)]);
    }
}
