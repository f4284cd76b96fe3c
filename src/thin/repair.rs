//! thin_repair and thin_dump --repair: recover what can be recovered.
//!
//! Sources, best first:
//! 1. the live superblock and its trees, read in salvage mode (damaged
//!    subtrees are left out, everything readable is kept);
//! 2. for devices the live trees lost, the metadata snapshot's trees (the
//!    kernel keeps every block the snapshot references allocated, so its
//!    mappings still point at the data they were written with);
//! 3. when neither superblock points at usable trees, a scan of the whole
//!    device for btree nodes, picking the most recent details tree (highest
//!    transaction id and time) and the top-level mapping tree that covers
//!    its devices best.
//!
//! The recovered pool is emitted as dump events: shared leaves are found
//! as dump finds them, and the builder keeps them shared. `mapped_blocks` is
//! recounted from the mappings recovered, so the result is consistent.

use std::collections::BTreeMap;

use crate::pdata::btree::{parse_leaf, salvage_leaves, Walker};
use crate::pdata::io::BlockDevice;
use crate::pdata::scan::{scan, Scan};
use crate::pdata::{self};
use crate::thin::device::{BlockTime, DeviceDetails};
use crate::thin::dump::{emit_devices, emit_planned, plan_emit, MetadataVisitor, SuperblockInfo};
use crate::thin::metadata::ThinDevice;
use crate::thin::restore::{build_pool, BuildError, BuiltPool, Overrides};
use crate::thin::superblock::{read_superblock, Superblock, SUPERBLOCK_LOCATION};
use crate::thin::Error;

/// What repair will rebuild from.
#[derive(Debug, Clone)]
pub struct RepairSource {
    pub info: SuperblockInfo,
    pub devices: Vec<ThinDevice>,
    /// What was damaged and where the survivors came from (for the user).
    pub notes: Vec<String>,
}

/// The highest dev id the kernel allows (24 bits).
const MAX_DEV_ID: u64 = (1 << 24) - 1;

struct Trees {
    details: BTreeMap<u64, DeviceDetails>,
    roots: BTreeMap<u64, u64>,
    details_ok: bool,
    roots_ok: bool,
}

/// Read a superblock's two trees, keeping whatever is readable.
fn read_trees(walker: &mut Walker, details_root: u64, mapping_root: u64) -> Trees {
    let d = walker.read_map::<DeviceDetails>(details_root, |_| {});
    let details_ok = !d.issues.iter().any(|i| i.fatal);
    let m = walker.read_map::<u64>(mapping_root, |_| {});
    let roots_ok = !m.issues.iter().any(|i| i.fatal);
    Trees {
        details: d
            .entries
            .into_iter()
            .filter(|(k, _)| *k <= MAX_DEV_ID)
            .collect(),
        roots: m
            .entries
            .into_iter()
            .filter(|(k, _)| *k <= MAX_DEV_ID)
            .collect(),
        details_ok,
        roots_ok,
    }
}

/// What a scanned tree holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Details,
    TopLevel,
    Bottom,
    Other,
}

/// The scan's nodes sorted into the thin trees they can belong to.
struct Classified<'s> {
    scan: &'s Scan,
    kinds: Vec<Kind>,
    /// Blocks some scanned internal node points at.
    referenced: fixedbitset::FixedBitSet,
}

impl<'s> Classified<'s> {
    fn new(dev: &BlockDevice, scan: &'s Scan) -> Self {
        let mut kinds = vec![Kind::Other; scan.nodes.len()];
        let mut referenced = fixedbitset::FixedBitSet::with_capacity(dev.nr_blocks() as usize);
        let mut buf = vec![0u8; pdata::BLOCK_SIZE];
        for (i, n) in scan.nodes.iter().enumerate() {
            if !n.leaf {
                for &c in scan.children_of(n) {
                    if (c as usize) < referenced.len() {
                        referenced.insert(c as usize);
                    }
                }
                continue;
            }
            kinds[i] = match n.value_size {
                24 => Kind::Details,
                8 if n.nr_entries > 0 => {
                    // A top-level leaf maps dev ids to bottom-level roots:
                    // every value is a node the scan found.
                    let top = dev.read_block(n.block, &mut buf).is_ok()
                        && crate::pdata::btree::Node::parse(n.block, &buf, 8).is_ok_and(|node| {
                            (0..node.nr_entries()).all(|j| {
                                node.key(j) <= MAX_DEV_ID
                                    && scan.node(node.value::<u64>(j)).is_some()
                            })
                        });
                    if top {
                        Kind::TopLevel
                    } else {
                        Kind::Bottom
                    }
                }
                8 => Kind::Bottom,
                _ => Kind::Other,
            };
        }
        // Internal nodes take the kind of their first child (bottom-up: a
        // few rounds cover any real tree height).
        for _ in 0..crate::pdata::btree::MAX_HEIGHT {
            let mut changed = false;
            for i in 0..scan.nodes.len() {
                let n = &scan.nodes[i];
                if n.leaf || kinds[i] != Kind::Other {
                    continue;
                }
                let k = scan
                    .children_of(n)
                    .first()
                    .and_then(|&c| scan.nodes.binary_search_by_key(&c, |m| m.block).ok())
                    .map(|j| kinds[j])
                    .unwrap_or(Kind::Other);
                if k != Kind::Other {
                    kinds[i] = k;
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        Classified {
            scan,
            kinds,
            referenced,
        }
    }

    /// Roots of trees of `kind`: nodes of that kind nothing points at.
    fn roots(&self, kind: Kind) -> Vec<u64> {
        self.scan
            .nodes
            .iter()
            .zip(&self.kinds)
            .filter(|(n, k)| **k == kind && !self.referenced.contains(n.block as usize))
            .map(|(n, _)| n.block)
            .collect()
    }

    /// Leaves under `root`, the latest time written in them, and how many
    /// mappings carry that time.
    fn leaves(&self, root: u64) -> (Vec<u64>, u32, u64) {
        let mut out = Vec::new();
        let mut stack = vec![(root, 0usize)];
        while let Some((b, depth)) = stack.pop() {
            let Some(n) = self.scan.node(b) else { continue };
            if n.leaf {
                out.push(b);
            } else if depth < crate::pdata::btree::MAX_HEIGHT {
                stack.extend(self.scan.children_of(n).iter().map(|&c| (c, depth + 1)));
            }
        }
        out.sort_unstable();
        out.dedup();
        let nodes: Vec<_> = out.iter().filter_map(|&b| self.scan.node(b)).collect();
        let latest = nodes.iter().map(|n| n.max_low24).max().unwrap_or(0);
        let at_latest = nodes
            .iter()
            .filter(|n| n.max_low24 == latest)
            .map(|n| n.nr_at_max as u64)
            .sum();
        (out, latest, at_latest)
    }
}

/// The (key, value) entries of the leaves `leaves`.
fn leaf_entries(dev: &BlockDevice, leaves: &[u64]) -> std::collections::HashSet<(u64, u64)> {
    let mut set = std::collections::HashSet::new();
    dev.read_in_order(leaves, 256, |_, b, data| {
        if let Ok(node) = data.and_then(|d| crate::pdata::btree::Node::parse(b, d, 8)) {
            set.extend((0..node.nr_entries()).map(|i| (node.key(i), node.value::<u64>(i))));
        }
        Ok::<(), std::convert::Infallible>(())
    })
    .ok();
    set
}

/// (highest transaction id, latest time, devices)
type DetailsScore = (u64, u32, usize);
/// (devices of the details tree covered, latest time, writes at it, devices)
type RootsScore = (usize, u32, u64, usize);

/// True when `score` beats the best so far (the first of equals wins).
fn better<S: Ord, T>(best: &Option<(S, T)>, score: &S) -> bool {
    match best {
        None => true,
        Some((s, _)) => score > s,
    }
}

/// From a scan: the most recent details tree and the top-level tree that
/// covers its devices best (then holds the latest writes).
fn trees_from_scan(dev: &BlockDevice, c: &Classified, notes: &mut Vec<String>) -> Trees {
    let mut best_details: Option<(DetailsScore, BTreeMap<u64, DeviceDetails>)> = None;
    for root in c.roots(Kind::Details) {
        let mut walker = Walker::new(dev);
        let d = walker.read_map::<DeviceDetails>(root, |_| {});
        let entries: BTreeMap<u64, DeviceDetails> = d
            .entries
            .into_iter()
            .filter(|(k, _)| *k <= MAX_DEV_ID)
            .collect();
        let score = (
            entries
                .values()
                .map(|d| d.transaction_id)
                .max()
                .unwrap_or(0),
            entries
                .values()
                .map(|d| d.creation_time.max(d.snapshotted_time))
                .max()
                .unwrap_or(0),
            entries.len(),
        );
        if better(&best_details, &score) {
            best_details = Some((score, entries));
        }
    }
    let details = best_details.map(|(_, d)| d).unwrap_or_default();
    let mut best_roots: Option<(RootsScore, BTreeMap<u64, u64>)> = None;
    for root in c.roots(Kind::TopLevel) {
        let mut walker = Walker::new(dev);
        let m = walker.read_map::<u64>(root, |_| {});
        let entries: BTreeMap<u64, u64> = m
            .entries
            .into_iter()
            .filter(|(k, _)| *k <= MAX_DEV_ID)
            .collect();
        let covered = entries.keys().filter(|k| details.contains_key(k)).count();
        let versions: Vec<(u32, u64)> = entries
            .values()
            .map(|&r| {
                let (_, t, n) = c.leaves(r);
                (t, n)
            })
            .collect();
        let latest = versions.iter().map(|v| v.0).max().unwrap_or(0);
        let at_latest = versions.iter().filter(|v| v.0 == latest).map(|v| v.1).sum();
        let score = (covered, latest, at_latest, entries.len());
        if better(&best_roots, &score) {
            best_roots = Some((score, entries));
        }
    }
    let roots = best_roots.map(|(_, r)| r).unwrap_or_default();
    notes.push(format!(
        "scan found {} btree nodes; using a details tree of {} devices and a mapping tree of {}",
        c.scan.nodes.len(),
        details.len(),
        roots.len()
    ));
    Trees {
        details,
        roots,
        details_ok: true,
        roots_ok: true,
    }
}

/// Mapping trees no top-level tree points at any more are what the live
/// top level pointed at when it was lost: give each device the newest such
/// tree that shares leaves with (so descends from) the tree it has now.
fn adopt_orphans(dev: &BlockDevice, c: &Classified, trees: &mut Trees, notes: &mut Vec<String>) {
    // Work is bounded: a large, aged pool has many stale leaves.
    const BUDGET: usize = 4096;
    let orphans: Vec<(u64, Vec<u64>, u32, u64)> = c
        .roots(Kind::Bottom)
        .into_iter()
        .map(|r| {
            let (l, t, n) = c.leaves(r);
            (r, l, t, n)
        })
        .collect();
    let in_use: std::collections::HashSet<u64> = trees.roots.values().copied().collect();
    let mut pairs = Vec::new();
    let mut work = 0usize;
    for (&id, &root) in trees.roots.iter() {
        let (mine, my_time, _) = c.leaves(root);
        let mut my_entries = None;
        for (oi, (r, leaves, t, n)) in orphans.iter().enumerate() {
            if in_use.contains(r) {
                continue;
            }
            work += leaves.len();
            if work > BUDGET * 64 {
                break;
            }
            // Related = shares leaves, or (a CoW copy of a leaf) mappings.
            let mut shared = leaves
                .iter()
                .filter(|l| mine.binary_search(l).is_ok())
                .count() as u64;
            if shared == 0 {
                let mine_e = my_entries.get_or_insert_with(|| leaf_entries(dev, &mine));
                shared = leaf_entries(dev, leaves).intersection(mine_e).count() as u64;
            }
            if shared > 0 {
                pairs.push((*t, *n, shared, id, oi, *t > my_time));
            }
        }
    }
    // An orphan belongs to the device it resembles most (an intermediate
    // version of one device also resembles that device's snapshots).
    let mut owner: std::collections::HashMap<usize, (u64, u64)> = std::collections::HashMap::new();
    for &(_, _, shared, id, oi, _) in &pairs {
        let e = owner.entry(oi).or_insert((shared, id));
        if shared > e.0 {
            *e = (shared, id);
        }
    }
    // ... and replaces its tree only if it is newer.
    pairs.retain(|&(_, _, _, id, oi, newer)| newer && owner[&oi].1 == id);
    // Newest first (latest time, most writes at it), then the closest relative.
    pairs.sort_unstable_by(|a, b| b.cmp(a));
    let mut taken_dev = std::collections::HashSet::new();
    let mut taken_orphan = std::collections::HashSet::new();
    for (_, _, _, id, oi, _) in pairs {
        if taken_dev.contains(&id) || taken_orphan.contains(&oi) {
            continue;
        }
        taken_dev.insert(id);
        taken_orphan.insert(oi);
        let r = orphans[oi].0;
        notes.push(format!(
            "device {id}: using the newer mapping tree at block {r} found by the scan"
        ));
        trees.roots.insert(id, r);
    }
}

/// Fill what `live` lost from `other` (devices and roots it does not have).
fn fill_from(live: &mut Trees, other: &Trees) {
    if !live.details_ok {
        for (&id, d) in &other.details {
            live.details.entry(id).or_insert(*d);
        }
    }
    if !live.roots_ok {
        for (&id, &r) in &other.roots {
            if live.details.contains_key(&id) || !live.details_ok {
                live.roots.entry(id).or_insert(r);
            }
        }
    }
}

/// What the mapping trees to be rebuilt hold, for the values the superblock
/// and the details tree lost.
#[derive(Debug, Default)]
struct Survey {
    /// The highest data block mapped.
    max_block: Option<u64>,
    /// The latest time a mapping carries.
    max_time: u32,
    /// Per device: the lowest snap_time under which every mapping it may
    /// share with another device lies (latest such time + 1; absent: none).
    need: BTreeMap<u64, u32>,
}

/// Data blocks mapped more than once, found in one pass over the leaves:
/// bitsets for the blocks below `dense`, a list for the blocks above it.
/// `dense` grows with the number of leaves read (each maps at most 252
/// blocks) up to 2^32 blocks (two 512 MiB bitsets), so a damaged leaf
/// mapping block 2^40 costs one list entry rather than bitsets reaching it.
struct Multiplicity {
    once: fixedbitset::FixedBitSet,
    twice: fixedbitset::FixedBitSet,
    dense: u64,
    sparse: Vec<u64>,
}

impl Multiplicity {
    fn new(nr_leaves: usize) -> Self {
        let dense = (nr_leaves as u64)
            .saturating_mul(252 * 16)
            .clamp(1 << 24, 1 << 32);
        Multiplicity {
            once: Default::default(),
            twice: Default::default(),
            dense,
            sparse: Vec::new(),
        }
    }

    fn add(&mut self, block: u64) {
        if block >= self.dense {
            self.sparse.push(block);
            return;
        }
        let k = block as usize;
        if k >= self.once.len() {
            let n = (k + 1).max(self.once.len() * 2).min(self.dense as usize);
            self.once.grow(n);
            self.twice.grow(n);
        }
        if self.once.put(k) {
            self.twice.insert(k);
        }
    }

    /// Done adding: keep only what [`Self::is_shared`] needs.
    fn finish(&mut self) {
        self.once = Default::default();
        self.sparse.sort_unstable();
        let mut shared: Vec<u64> = self
            .sparse
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        shared.dedup();
        self.sparse = shared;
    }

    /// Mapped more than once (after [`Self::finish`]).
    fn is_shared(&self, block: u64) -> bool {
        if block < self.dense {
            self.twice.contains(block as usize)
        } else {
            self.sparse.binary_search(&block).is_ok()
        }
    }
}

/// Read the leaves of `roots` (each distinct leaf twice): a mapping may be
/// shared when its leaf is in two devices' trees or its data block is mapped
/// from two distinct leaves.
///
/// With `limit` (the surviving superblock's pool time), a mapping time after
/// it is damage: it counts as time 0, as [`emit_devices`] emits it.
fn survey(dev: &BlockDevice, roots: &BTreeMap<u64, u64>, limit: Option<u32>) -> Survey {
    let time_of = |bt: BlockTime| {
        if limit.is_some_and(|l| bt.time > l) {
            0
        } else {
            bt.time
        }
    };
    // The leaves emit_devices will emit (the same salvage reading).
    let ids: Vec<u64> = roots.keys().copied().collect();
    let root_blocks: Vec<u64> = roots.values().copied().collect();
    let per_dev: Vec<(u64, Vec<u64>)> = ids
        .into_iter()
        .zip(salvage_leaves(dev, &root_blocks, 8, |_| {}))
        .map(|(id, mut l)| {
            l.sort_unstable();
            l.dedup();
            (id, l)
        })
        .collect();
    // The distinct leaves, sorted, and how many devices hold each.
    let mut all: Vec<u64> = per_dev
        .iter()
        .flat_map(|(_, l)| l.iter().copied())
        .collect();
    all.sort_unstable();
    let mut holders: Vec<u32> = Vec::new();
    let mut w = 0;
    for r in 0..all.len() {
        if w > 0 && all[w - 1] == all[r] {
            holders[w - 1] += 1;
        } else {
            all[w] = all[r];
            holders.push(1);
            w += 1;
        }
    }
    all.truncate(w);
    const NONE: u32 = u32::MAX;

    // Pass 1: the highest block and time; data blocks mapped once / twice.
    let mut out = Survey::default();
    let mut leaf_time = vec![NONE; all.len()];
    let mut mapped = Multiplicity::new(all.len());
    dev.read_in_order(&all, 1024, |i, b, data| {
        let Ok(node) = data.and_then(|d| parse_leaf(b, d, 8)) else {
            return Ok::<(), std::convert::Infallible>(());
        };
        let mut t_max = None;
        for j in 0..node.nr_entries() {
            let bt = BlockTime::unpack(node.value::<u64>(j));
            t_max = t_max.max(Some(time_of(bt)));
            out.max_block = out.max_block.max(Some(bt.block));
            mapped.add(bt.block);
        }
        if let Some(t) = t_max {
            out.max_time = out.max_time.max(t);
            leaf_time[i] = t;
        }
        Ok(())
    })
    .ok();
    mapped.finish();

    // Pass 2: per leaf, the latest time of a mapping that may be shared.
    let mut shared_time = vec![NONE; all.len()];
    let mut private = Vec::new();
    for (i, &t) in leaf_time.iter().enumerate() {
        if t == NONE {
            continue;
        }
        if holders[i] > 1 {
            shared_time[i] = t;
        } else {
            private.push(i);
        }
    }
    let blocks: Vec<u64> = private.iter().map(|&i| all[i]).collect();
    dev.read_in_order(&blocks, 1024, |k, b, data| {
        let Ok(node) = data.and_then(|d| parse_leaf(b, d, 8)) else {
            return Ok::<(), std::convert::Infallible>(());
        };
        let t = (0..node.nr_entries())
            .map(|j| BlockTime::unpack(node.value::<u64>(j)))
            .filter(|bt| mapped.is_shared(bt.block))
            .map(time_of)
            .max();
        if let Some(t) = t {
            shared_time[private[k]] = t;
        }
        Ok(())
    })
    .ok();
    for (id, l) in &per_dev {
        let t = l
            .iter()
            .filter_map(|b| all.binary_search(b).ok())
            .map(|i| shared_time[i])
            .filter(|&t| t != NONE)
            .max();
        if let Some(t) = t {
            out.need.insert(*id, t.saturating_add(1));
        }
    }
    out
}

/// Decide what to rebuild from.
pub fn find_source(
    dev: &BlockDevice,
    overrides: Overrides,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<RepairSource, Error> {
    let mut notes = Vec::new();
    let sb = read_superblock(dev, SUPERBLOCK_LOCATION);
    let mut walker = Walker::new(dev);
    // Without a superblock, the latest write time found in the mappings.
    let mut latest_mapping_time = 0;
    let (mut trees, sb_fields): (Trees, Option<Superblock>) = match &sb {
        Ok(sb) => {
            let mut t = read_trees(&mut walker, sb.details_root, sb.mapping_root);
            if !(t.details_ok && t.roots_ok) && sb.metadata_snap != 0 {
                if let Ok(snap) = read_superblock(dev, sb.metadata_snap) {
                    let mut w = Walker::new(dev);
                    let s = read_trees(&mut w, snap.details_root, snap.mapping_root);
                    notes.push(format!(
                        "live trees damaged; devices they lost are taken from the metadata snapshot at block {}",
                        sb.metadata_snap
                    ));
                    fill_from(&mut t, &s);
                }
            }
            if !t.roots_ok {
                let s = scan(dev, progress).map_err(|e| Error::metadata("scan", e))?;
                let c = Classified::new(dev, &s);
                if t.roots.is_empty() {
                    let found = trees_from_scan(dev, &c, &mut notes);
                    fill_from(&mut t, &found);
                }
                adopt_orphans(dev, &c, &mut t, &mut notes);
            }
            (t, Some(sb.clone()))
        }
        Err(e) => {
            notes.push(format!("superblock damaged ({e}); scanning for the trees"));
            let s = scan(dev, progress).map_err(|e| Error::metadata("scan", e))?;
            // A metadata snapshot's superblock copy still tells block size and time.
            let copy = s
                .superblocks
                .iter()
                .filter_map(|&b| read_superblock(dev, b).ok())
                .max_by_key(|c| (c.transaction_id, c.time));
            let c = Classified::new(dev, &s);
            let mut found = trees_from_scan(dev, &c, &mut notes);
            adopt_orphans(dev, &c, &mut found, &mut notes);
            latest_mapping_time = c
                .scan
                .nodes
                .iter()
                .zip(&c.kinds)
                .filter(|(n, k)| **k == Kind::Bottom && n.leaf)
                .map(|(n, _)| n.max_low24)
                .max()
                .unwrap_or(0);
            (found, copy)
        }
    };
    if trees.details.is_empty() && trees.roots.is_empty() {
        return Err(Error::Inconsistent(
            "no recoverable device details or mapping trees found (no compatible roots found); nothing written".into(),
        ));
    }

    // Every value the superblock held is authoritative only when the
    // superblock and both of its trees survived whole.
    let intact = sb.is_ok()
        && trees.details_ok
        && trees.roots_ok
        && trees.roots.keys().all(|id| trees.details.contains_key(id));
    let survey = if intact {
        None
    } else {
        Some(survey(dev, &trees.roots, sb.as_ref().ok().map(|s| s.time)))
    };

    let data_block_size = overrides
        .data_block_size
        .or(sb_fields.as_ref().map(|s| s.data_block_size))
        .ok_or_else(|| {
            Error::Inconsistent(
                "the superblock is damaged and no copy of it survived: give the data block size (--data-block-size)"
                    .into(),
            )
        })?;
    let nr_data_blocks = match (overrides.nr_data_blocks, &sb) {
        (Some(n), _) => n,
        (None, Ok(s)) => s.data_sm().nr_blocks,
        (None, Err(_)) => {
            // The pool never shrinks: it is at least as large as when the
            // metadata snapshot's copy was taken, and holds every block mapped.
            // (The kernel zeroes the space map roots of its copy.)
            let copy = sb_fields
                .as_ref()
                .map(|s| s.data_sm().nr_blocks)
                .filter(|&n| n > 0);
            let mapped = survey.as_ref().and_then(|s| s.max_block).map(|b| b + 1);
            let n = copy.max(mapped).ok_or_else(|| {
                Error::Inconsistent(
                    "the superblock is damaged and no data block is mapped: give --nr-data-blocks"
                        .into(),
                )
            })?;
            notes.push(match (copy, mapped) {
                (Some(c), Some(m)) if c >= m => format!(
                    "nr_data_blocks {n} taken from the metadata snapshot's superblock copy (highest mapped data block {})",
                    m - 1
                ),
                (Some(c), _) => format!(
                    "nr_data_blocks {n} = the highest mapped data block + 1 (the metadata snapshot's copy says {c})"
                ),
                _ => format!("nr_data_blocks {n} = the highest mapped data block + 1"),
            });
            n
        }
    };

    let mut time = sb_fields.as_ref().map(|s| s.time).unwrap_or(0);
    let transaction = match (overrides.transaction_id, &sb) {
        (Some(t), _) => t,
        (None, Ok(s)) => s.transaction_id,
        (None, Err(_)) => {
            // LVM accepts the id it recorded or one ahead; a device's id is
            // the pool's before the transaction that changed it.
            let devs = trees
                .details
                .values()
                .map(|d| d.transaction_id.saturating_add(1))
                .max();
            let copy = sb_fields.as_ref().map(|s| s.transaction_id);
            let t = devs.max(copy).unwrap_or(0);
            notes.push(match (devs, copy) {
                (None, None) => {
                    "no transaction id survived: transaction id 0 (give --transaction-id)".into()
                }
                (Some(d), c) if Some(d) >= c => {
                    format!("transaction id {t} = the highest device transaction id + 1")
                }
                _ => {
                    format!("transaction id {t} taken from the metadata snapshot's superblock copy")
                }
            });
            t
        }
    };
    let mut details = trees.details.clone();
    if let Ok(s) = &sb {
        // The kernel never records a time after its pool time: such a time
        // is damage. Lowering a snap_time to the pool time only treats more
        // mappings as shared (copied on write), never fewer.
        for (id, d) in details.iter_mut() {
            if d.creation_time > s.time || d.snapshotted_time > s.time {
                notes.push(format!(
                    "device {id}: creation time {} / snap_time {} after the pool's time {}: lowered to it",
                    d.creation_time, d.snapshotted_time, s.time
                ));
                d.creation_time = d.creation_time.min(s.time);
                d.snapshotted_time = d.snapshotted_time.min(s.time);
            }
        }
    }
    if let Some(sv) = &survey {
        // The kernel treats a mapping as shared iff its time is below the
        // snap_time of the device holding it, and stamps new mappings with
        // the pool time. So: the pool time is above every time seen; every
        // mapping another device may also hold is below its device's
        // snap_time; a device whose details are lost has all its mappings
        // treated as shared.
        let seen = details
            .values()
            .map(|d| d.creation_time.max(d.snapshotted_time))
            .chain([sv.max_time, latest_mapping_time])
            .max()
            .unwrap_or(0);
        // The pool time is never below a time written (the kernel's own,
        // when the superblock survives). A device whose details are lost gets
        // snap_time = the pool time, so that must be above every time seen:
        // all its mappings are then treated as shared.
        let rebuilt_any = trees.roots.keys().any(|id| !details.contains_key(id));
        time = if rebuilt_any {
            time.max(seen.saturating_add(1))
        } else {
            time.max(seen)
        };
        for (&id, &need) in &sv.need {
            time = time.max(need);
            if let Some(d) = details.get_mut(&id) {
                if d.snapshotted_time < need {
                    notes.push(format!(
                        "device {id}: snap_time {} raised to {need}: mappings it shares with other devices were written at or after it",
                        d.snapshotted_time
                    ));
                    d.snapshotted_time = need;
                }
                time = time.max(d.snapshotted_time);
            }
        }
        let rebuilt: Vec<u64> = trees
            .roots
            .keys()
            .filter(|id| !details.contains_key(id))
            .copied()
            .collect();
        if sb.is_err() {
            notes.push(if rebuilt_any {
                format!("pool time {time} = the latest time the survivors carry + 1")
            } else {
                format!("pool time {time} = the latest time the survivors carry")
            });
        }
        if !rebuilt.is_empty() {
            notes.push(format!(
                "details of device(s) {} rebuilt: creation_time = snap_time = {time} (the pool time: every mapping written before it is treated as shared), transaction id {transaction}",
                rebuilt
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    let info = SuperblockInfo {
        uuid: String::new(),
        time: time as u64,
        transaction,
        flags: 0,
        version: 2,
        data_block_size,
        nr_data_blocks,
        metadata_snap: None,
    };

    // Devices: every id either tree knows. No mapping tree = no mappings;
    // no details = details made up from the pool's state. A device's
    // transaction id is the pool's before the transaction that wrote it, so a
    // made-up one is the pool's - 1: a later repair that loses the superblock
    // (highest device id + 1) then gives the pool's id again, which LVM needs
    // to activate the pool.
    let mut ids: Vec<u64> = details.keys().chain(trees.roots.keys()).copied().collect();
    ids.sort_unstable();
    ids.dedup();
    let mut devices = Vec::new();
    for id in ids {
        let details = details.get(&id).copied().unwrap_or(DeviceDetails {
            mapped_blocks: 0,
            transaction_id: info.transaction.saturating_sub(1),
            creation_time: time,
            snapshotted_time: time,
        });
        let root = trees.roots.remove(&id);
        devices.push(ThinDevice {
            id,
            details,
            root: root.unwrap_or(u64::MAX),
        });
    }
    Ok(RepairSource {
        info,
        devices,
        notes,
    })
}

/// Emit the recovered pool as dump events.
pub fn emit(
    dev: &BlockDevice,
    src: &RepairSource,
    out: &mut dyn MetadataVisitor,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), Error> {
    let mut walker = Walker::new(dev);
    emit_devices(&mut walker, &src.info, &src.devices, true, out, progress)
}

/// thin_repair: rebuild `input`'s metadata onto `output`.
pub fn repair(
    input: &BlockDevice,
    output: &BlockDevice,
    overrides: Overrides,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(RepairSource, BuiltPool), BuildError> {
    let src = find_source(input, overrides, progress).map_err(input_error)?;
    let built = write_repaired(input, &src, output)?;
    Ok((src, built))
}

/// Write what [`find_source`] found onto `output`.
pub fn write_repaired(
    input: &BlockDevice,
    src: &RepairSource,
    output: &BlockDevice,
) -> Result<BuiltPool, BuildError> {
    // Both passes of the build (validate, write) stream the same leaves:
    // the walk that finds them is done once.
    let mut walker = Walker::new(input);
    let plan = plan_emit(&mut walker, &src.info, &src.devices, true)
        .map_err(|e| input_error(e).noting("nothing was written"))?;
    build_pool(output, Overrides::default(), false, |b, _| {
        // The read of the input and the build of the output take a core each.
        crate::thin::restore::pipelined(
            |out| emit_planned(&walker, &plan, &src.info, &src.devices, out, &mut |_, _| {}),
            b,
        )?
        .map_err(input_error)
    })
}

/// A failure reading the input: I/O errors apart from damage.
pub fn input_error(e: Error) -> BuildError {
    match &e {
        Error::Metadata { source, .. } if source.is_io() => BuildError::InputIo(e.to_string()),
        _ => BuildError::Input(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::Multiplicity;

    /// Blocks mapped twice are found below and above the dense bound, and a
    /// block far beyond it (a damaged leaf) does not grow the bitsets.
    #[test]
    fn multiplicity_is_exact_and_bounded_for_far_blocks() {
        let mut m = Multiplicity::new(4);
        assert_eq!(m.dense, 1 << 24);
        for b in [5, 7, 5, 1 << 40, 1 << 40, (1 << 40) + 1, (1 << 24) - 1] {
            m.add(b);
        }
        assert!(m.once.len() <= 1 << 24 && m.twice.len() <= 1 << 24);
        m.finish();
        assert!(m.is_shared(5));
        assert!(!m.is_shared(7));
        assert!(!m.is_shared((1 << 24) - 1));
        assert!(m.is_shared(1 << 40));
        assert!(!m.is_shared((1 << 40) + 1));
        assert!(!m.is_shared(123_456_789_012));
        // The bound grows with the leaves, up to 2^32 blocks.
        assert_eq!(Multiplicity::new(usize::MAX).dense, 1 << 32);
    }
}
