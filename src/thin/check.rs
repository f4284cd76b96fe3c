//! thin_check: validate a pool's metadata and recompute both space maps.
//!
//! Checks, in order: the superblock (checksum, location, magic, version,
//! feature flags, block sizes); the device details tree and the top level
//! of the mapping tree, and that they name the same devices; every
//! device's mapping tree (node validity, key order and ranges, equal leaf
//! depth, loops, data blocks inside the pool, times not after the pool's
//! time, mapped_blocks); the same for the metadata snapshot's trees; then
//! both space maps, compared block by block with the counts the trees imply
//! (leaks, under- and over-counts, damaged bitmaps and index).

use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8};

use crate::pdata::btree::{Issue, TreeLeaves, Walker};
use crate::pdata::counts::RefCounts;
use crate::pdata::error::Error as PError;
use crate::pdata::io::BlockDevice;
use crate::pdata::space_map::{DiskSpaceMap, SmDiff, SmKind};
use crate::thin::device::BlockTime;
use crate::thin::metadata::{Devices, ThinDevice};
use crate::thin::superblock::{read_superblock, Superblock, SUPERBLOCK_LOCATION};

#[derive(Debug, Clone, Default)]
pub struct CheckOptions {
    pub sb_only: bool,
    pub skip_mappings: bool,
    pub ignore_non_fatal: bool,
    /// Check the metadata snapshot's trees only (a live pool's `-m`).
    pub metadata_snap: bool,
    pub override_mapping_root: Option<u64>,
    pub override_details_root: Option<u64>,
    /// Keep the recomputed reference counts in the report (for
    /// [`rebuild_space_maps`]).
    pub keep_counts: bool,
}

/// Reference counts a check recomputed from the trees.
#[derive(Debug, Clone)]
pub struct Counts {
    /// Metadata blocks of the superblocks and trees (not of the space maps).
    pub metadata: RefCounts,
    pub data: RefCounts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The kernel would misbehave or data is at risk.
    Fatal,
    /// Tolerated by the kernel (leaks, node fill, hints); fails the check
    /// unless non-fatal errors are ignored.
    NonFatal,
}

#[derive(Debug, Clone)]
pub struct Finding {
    pub severity: Severity,
    /// Where: "superblock", "mapping tree of device 3", "data space map", ...
    pub area: String,
    pub message: String,
    /// An I/O error rather than damage.
    pub io: bool,
}

#[derive(Debug, Default)]
pub struct CheckReport {
    pub superblock: Option<Superblock>,
    pub findings: Vec<Finding>,
    /// Leaked blocks per space map (trivially repairable).
    pub data_leaks: u64,
    pub metadata_leaks: u64,
    /// Non-fatal findings of the space-map comparison (leaks, index and
    /// root counters): all fixed by [`rebuild_space_maps`].
    pub space_map_findings: usize,
    /// With [`CheckOptions::keep_counts`], when the trees could be read.
    pub counts: Option<Counts>,
}

impl CheckReport {
    pub fn passed(&self, ignore_non_fatal: bool) -> bool {
        !self
            .findings
            .iter()
            .any(|f| f.severity == Severity::Fatal || !ignore_non_fatal)
    }

    /// True when rebuilding the space maps from the recomputed counts
    /// fixes every finding that fails the check: there are space-map
    /// findings (leaks, counters), nothing fatal, and no other non-fatal
    /// finding unless those are ignored.
    pub fn space_maps_repairable(&self, ignore_non_fatal: bool) -> bool {
        !self.has_fatal()
            && self.space_map_findings > 0
            && (ignore_non_fatal || self.findings.len() == self.space_map_findings)
    }

    /// `METADATA_FREE_BLOCKS` as LVM and scripts read it.
    pub fn metadata_free_blocks(&self) -> Option<u64> {
        self.superblock.as_ref().map(|sb| {
            let r = sb.metadata_sm();
            r.nr_blocks.saturating_sub(r.nr_allocated)
        })
    }

    fn fatal(&mut self, area: impl Into<String>, e: &PError) {
        self.findings.push(Finding {
            severity: Severity::Fatal,
            area: area.into(),
            message: e.to_string(),
            io: e.is_io(),
        });
    }

    fn add(&mut self, severity: Severity, area: impl Into<String>, message: impl Into<String>) {
        self.findings.push(Finding {
            severity,
            area: area.into(),
            message: message.into(),
            io: false,
        });
    }

    fn issue(&mut self, area: impl Into<String>, i: &Issue) {
        let severity = if i.fatal {
            Severity::Fatal
        } else {
            Severity::NonFatal
        };
        self.findings.push(Finding {
            severity,
            area: area.into(),
            message: i.error.to_string(),
            io: i.error.is_io(),
        });
    }

    fn has_fatal(&self) -> bool {
        self.findings.iter().any(|f| f.severity == Severity::Fatal)
    }
}

/// At most this many blocks are named per kind of problem; the rest are counted.
const MAX_LISTED: usize = 10;

/// Mapping leaves read and validated per batch (2 MiB).
const LEAF_BATCH: usize = 512;

/// A run of consecutive data blocks on its way to be counted, packed as `start << RUN_LEN_BITS | length` (data blocks are 40-bit).
const RUN_LEN_BITS: u32 = 24;
const MAX_RUN: u64 = (1 << RUN_LEN_BITS) - 1;

/// The most 8-byte values a node's value area can hold: the bound of
/// `nr_entries` for any leaf `Node::parse` accepted (not only the kernel's
/// own `max_entries`).
const MAX_LEAF_ENTRIES: usize =
    (crate::pdata::BLOCK_SIZE - crate::pdata::btree::NODE_HEADER_SIZE) / 16;

/// How many runs ahead [`count_runs`] asks for counts.
const PREFETCH_AHEAD: usize = 16;

/// What the mapping leaves' values say besides the counts: mappings beyond
/// the data device or after the pool's time.
struct DataScan {
    nr_data_blocks: u64,
    sb_time: u32,
    nr_beyond: u64,
    /// (leaf, key, data block), the first [`MAX_LISTED`].
    beyond: Vec<(u64, u64, u64)>,
    nr_future: u64,
    /// (leaf, key, time), the first [`MAX_LISTED`].
    future: Vec<(u64, u64, u32)>,
    /// Where a leaf's runs start (see [`run_starts`]), kept from leaf to
    /// leaf: a fresh array would be zeroed for every leaf.
    at: Box<[u32; MAX_LEAF_ENTRIES + 1]>,
}

impl DataScan {
    fn new(nr_data_blocks: u64, sb_time: u32) -> DataScan {
        DataScan {
            nr_data_blocks,
            sb_time,
            nr_beyond: 0,
            beyond: Vec::new(),
            nr_future: 0,
            future: Vec::new(),
            at: Box::new([0; MAX_LEAF_ENTRIES + 1]),
        }
    }

    /// Append the runs of consecutive data blocks that leaf `b` (accepted
    /// by [`Walker::check_leaf`]) maps to `runs`, packed: a run into an
    /// even stripe of `1 << stripe_shift` blocks to `runs[0]`, into an odd
    /// one to `runs[1]` (a run across stripes is cut at their boundary).
    ///
    /// Mappings come in runs at scattered places (fragmented data); a run
    /// is counted a word at a time. This runs once per mapping (883 M times
    /// on a 16 GiB pool), on the thread that just read the leaf (its bytes
    /// are in this core's cache); see [`run_starts`].
    /// Bad values (beyond the data device, after the pool's time) are rare:
    /// the scan only notices them, a second look lists them. Blocks beyond
    /// the data device stay in the runs: counting ignores them.
    #[inline(never)]
    fn scan_leaf(
        &mut self,
        b: u64,
        node: &crate::pdata::btree::Node,
        runs: &mut [Vec<u64>; 2],
        stripe_shift: u32,
    ) {
        let values = node.value_area();
        let n = values.len() / 8;
        if n == 0 {
            return;
        }
        let at = &mut *self.at;
        let (k, bad) = run_starts(values, self.nr_data_blocks, self.sb_time, at);
        at[k] = n as u32;
        runs[0].reserve(k);
        runs[1].reserve(k);
        for j in 0..k {
            let i = at[j] as usize;
            let block = value_at(values, i) >> 24;
            let len = (at[j + 1] - at[j]) as u64;
            let run = block << RUN_LEN_BITS | len;
            if (block ^ (block + len - 1)) >> stripe_shift == 0 {
                runs[((block >> stripe_shift) & 1) as usize].push(run);
            } else {
                cut_run(run, stripe_shift, runs);
            }
        }
        if bad {
            self.list_bad_values(b, node);
        }
    }

    /// Join two scans of disjoint sets of leaves, listing the first bad
    /// values in leaf order as one scan in leaf order would.
    fn merge(mut self, other: DataScan) -> DataScan {
        self.nr_beyond += other.nr_beyond;
        self.beyond.extend(other.beyond);
        self.beyond.sort_unstable();
        self.beyond.truncate(MAX_LISTED);
        self.nr_future += other.nr_future;
        self.future.extend(other.future);
        self.future.sort_unstable();
        self.future.truncate(MAX_LISTED);
        self
    }

    #[cold]
    fn list_bad_values(&mut self, b: u64, node: &crate::pdata::btree::Node) {
        for i in 0..node.nr_entries() {
            let bt = BlockTime::unpack(node.value::<u64>(i));
            if bt.block >= self.nr_data_blocks {
                self.nr_beyond += 1;
                if self.beyond.len() < MAX_LISTED {
                    self.beyond.push((b, node.key(i), bt.block));
                }
            } else if bt.time > self.sb_time {
                self.nr_future += 1;
                if self.future.len() < MAX_LISTED {
                    self.future.push((b, node.key(i), bt.time));
                }
            }
        }
    }
}

/// Value `i` of a leaf's value area.
#[inline(always)]
fn value_at(values: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(values[8 * i..8 * i + 8].try_into().expect("8 bytes"))
}

/// The entries of a leaf's value area (block << 24 | time, 1 to
/// [`MAX_LEAF_ENTRIES`] of them) that start a run of consecutive data
/// blocks, into `at` (entry 0 always); returns their number and whether any
/// value is bad (a block at or beyond `nr_data_blocks`, a time after
/// `sb_time`). Four entries at a time with AVX2 where the CPU has it.
fn run_starts(
    values: &[u8],
    nr_data_blocks: u64,
    sb_time: u32,
    at: &mut [u32; MAX_LEAF_ENTRIES + 1],
) -> (usize, bool) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        return unsafe { run_starts_avx2(values, nr_data_blocks, sb_time, at) };
    }
    run_starts_scalar(values, nr_data_blocks, sb_time, at)
}

/// [`run_starts`] without a branch per entry: runs average ~8 mappings, so
/// "does the run go on?" would be mispredicted every few entries. Every
/// entry is written out as a candidate and kept only when it starts a run.
fn run_starts_scalar(
    values: &[u8],
    nr_data_blocks: u64,
    sb_time: u32,
    at: &mut [u32; MAX_LEAF_ENTRIES + 1],
) -> (usize, bool) {
    let n = values.len() / 8;
    let (mut max_v, mut max_time) = (0u64, 0u64);
    let mut k = 0usize;
    let mut prev = (value_at(values, 0) >> 24).wrapping_sub(2);
    for i in 0..n {
        let v = value_at(values, i);
        let block = v >> 24;
        max_v = max_v.max(v);
        max_time = max_time.max(v & 0xff_ffff);
        at[k] = i as u32;
        k += (block != prev.wrapping_add(1)) as usize;
        prev = block;
    }
    let bad = (max_v >> 24) >= nr_data_blocks || max_time > sb_time as u64;
    (k, bad)
}

/// The set bits of each 4-bit mask, lowest first (then padding).
#[cfg(target_arch = "x86_64")]
const STARTS_OF_MASK: [[u8; 4]; 16] = {
    let mut t = [[0u8; 4]; 16];
    let mut m = 0;
    while m < 16 {
        let (mut k, mut bit) = (0, 0);
        while bit < 4 {
            if m & (1 << bit) != 0 {
                t[m][k] = bit as u8;
                k += 1;
            }
            bit += 1;
        }
        m += 1;
    }
    t
};

/// [`run_starts`] four entries at a time: each entry's block is compared
/// with its predecessor's plus one (an unaligned load one entry back), and
/// the run starts come out as a 4-bit mask.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn run_starts_avx2(
    values: &[u8],
    nr_data_blocks: u64,
    sb_time: u32,
    at: &mut [u32; MAX_LEAF_ENTRIES + 1],
) -> (usize, bool) {
    use std::arch::x86_64::*;
    let n = values.len() / 8;
    let first = value_at(values, 0);
    let mut bad = nr_data_blocks == 0
        || (first >> 24) >= nr_data_blocks
        || (first & 0xff_ffff) > sb_time as u64;
    at[0] = 0;
    let mut k = 1usize;
    let p = values.as_ptr();
    let one = _mm256_set1_epi64x(1);
    let sign = _mm256_set1_epi64x(i64::MIN);
    // Unsigned "block > nr_data_blocks - 1" as a signed compare.
    let last_block = _mm256_set1_epi64x((nr_data_blocks.wrapping_sub(1) ^ (1 << 63)) as i64);
    let time_mask = _mm256_set1_epi64x(0xff_ffff);
    let max_time = _mm256_set1_epi64x(sb_time as i64);
    let mut badv = _mm256_setzero_si256();
    let mut i = 1;
    while i + 4 <= n {
        // SAFETY: entries i - 1 .. i + 4 lie inside `values` (i >= 1, i + 4 <= n).
        let (v, before) = unsafe {
            (
                _mm256_loadu_si256(p.add(8 * i).cast()),
                _mm256_loadu_si256(p.add(8 * (i - 1)).cast()),
            )
        };
        let cur = _mm256_srli_epi64(v, 24);
        let next = _mm256_add_epi64(_mm256_srli_epi64(before, 24), one);
        let goes_on = _mm256_cmpeq_epi64(cur, next);
        let starts = !(_mm256_movemask_pd(_mm256_castsi256_pd(goes_on)) as u32) & 0xf;
        badv = _mm256_or_si256(
            badv,
            _mm256_cmpgt_epi64(_mm256_xor_si256(cur, sign), last_block),
        );
        badv = _mm256_or_si256(
            badv,
            _mm256_cmpgt_epi64(_mm256_and_si256(v, time_mask), max_time),
        );
        // All four candidates are written, the starts first (from a
        // table): a loop over the set bits would be mispredicted every few
        // entries. k <= i here, so k + 4 <= n.
        let first = &STARTS_OF_MASK[starts as usize];
        let slots = &mut at[k..k + 4];
        for (slot, &f) in slots.iter_mut().zip(first) {
            *slot = i as u32 + f as u32;
        }
        k += starts.count_ones() as usize;
        i += 4;
    }
    while i < n {
        let v = value_at(values, i);
        let block = v >> 24;
        if block != (value_at(values, i - 1) >> 24).wrapping_add(1) {
            at[k] = i as u32;
            k += 1;
        }
        bad |= block >= nr_data_blocks || (v & 0xff_ffff) > sb_time as u64;
        i += 1;
    }
    bad |= _mm256_movemask_pd(_mm256_castsi256_pd(badv)) != 0;
    (k, bad)
}

/// Count packed runs (see [`DataScan::scan_leaf`]). The counts of
/// fragmented data are scattered over hundreds of MiB: each run's counts
/// are asked for [`PREFETCH_AHEAD`] runs before they are counted, so many
/// memory reads are under way at once instead of one after another.
fn count_runs(counts: &mut RefCounts, runs: &[u64]) {
    let ahead = runs.get(PREFETCH_AHEAD..).unwrap_or(&[]);
    for (&r, &next) in runs.iter().zip(ahead) {
        counts.prefetch(next >> RUN_LEN_BITS);
        counts.inc_run(r >> RUN_LEN_BITS, r & MAX_RUN);
    }
    for &r in &runs[ahead.len()..] {
        counts.inc_run(r >> RUN_LEN_BITS, r & MAX_RUN);
    }
}

/// Blocks per stripe of the data device: the two leaf workers each count
/// the references into every other stripe. A stripe is a slab of the
/// counts (4 Mi blocks), so each slab has one owner and is allocated once.
const STRIPE_SHIFT: u32 = crate::pdata::counts::SLAB_SHIFT;

/// How a check splits its work between the two leaf workers (tests make
/// both small, so that small pools take every path).
#[derive(Debug, Clone, Copy)]
struct Split {
    /// Leaves a worker reads at once; the workers take alternate batches.
    leaf_batch: usize,
    /// log2 of the blocks in a stripe of the data device.
    stripe_shift: u32,
    /// Run the second worker on a thread of its own (false: as when the
    /// thread cannot be started).
    second_thread: bool,
    /// Metadata blocks in use (as the superblock's space map says) from
    /// which the space maps are loaded on a thread of their own beside the
    /// walk: on a small pool starting the thread costs more than it saves.
    space_map_thread_from: u64,
}

const SPLIT: Split = Split {
    leaf_batch: LEAF_BATCH,
    stripe_shift: STRIPE_SHIFT,
    second_thread: true,
    space_map_thread_from: 1 << 14,
};

/// Cut a packed run that crosses stripe boundaries (stripes of
/// `1 << shift` blocks) into one piece per stripe, each pushed to the
/// vector of its stripe's parity. Rare: runs are short beside a stripe.
#[cold]
fn cut_run(run: u64, shift: u32, runs: &mut [Vec<u64>; 2]) {
    let mut start = run >> RUN_LEN_BITS;
    let end = start + (run & MAX_RUN);
    loop {
        let stripe_end = ((start >> shift) + 1) << shift;
        let piece_end = end.min(stripe_end);
        runs[((start >> shift) & 1) as usize].push(start << RUN_LEN_BITS | (piece_end - start));
        if piece_end == end {
            break;
        }
        start = piece_end;
    }
}

/// What the two leaf workers share (read-only, or one writer per element).
#[derive(Clone, Copy)]
struct LeafContext<'a> {
    dev: &'a BlockDevice,
    walker: &'a Walker<'a>,
    /// Roots that are leaves themselves (allowed to be under-filled), sorted.
    root_leaves: &'a [u64],
    nr_entries: &'a [AtomicU8],
    nr_data_blocks: u64,
    sb_time: u32,
    split: Split,
    /// Leaves read by both workers so far.
    done: &'a AtomicU64,
}

/// What one leaf worker found.
struct LeafWork {
    /// References into this worker's stripes only.
    counts: RefCounts,
    scan: DataScan,
    leaf_errors: Vec<(u64, PError)>,
    fill_issues: Vec<(u64, Issue)>,
}

impl LeafContext<'_> {
    /// Read, validate and count `batches` of sorted leaves as worker `id`
    /// (0 or 1): runs into the other worker's stripes go out on `to_other`,
    /// and the other's runs into ours come in on `from_other` until it is
    /// done. `progress(leaves read by both)` is called after each batch.
    fn work<'b>(
        &self,
        id: usize,
        counts: RefCounts,
        batches: impl Iterator<Item = &'b [u64]>,
        to_other: std::sync::mpsc::Sender<Vec<u64>>,
        from_other: std::sync::mpsc::Receiver<Vec<u64>>,
        progress: &mut dyn FnMut(u64),
    ) -> LeafWork {
        let mut w = LeafWork {
            counts,
            scan: DataScan::new(self.nr_data_blocks, self.sb_time),
            leaf_errors: Vec::new(),
            fill_issues: Vec::new(),
        };
        let mut buf = vec![0u8; self.split.leaf_batch * crate::pdata::BLOCK_SIZE];
        let mut failed = Vec::new();
        let mut runs = [Vec::new(), Vec::new()];
        for chunk in batches {
            self.dev.read_sorted(chunk, &mut buf, &mut failed);
            for (slot, &b) in chunk.iter().enumerate() {
                let off = slot * crate::pdata::BLOCK_SIZE;
                let res = match failed[slot].take() {
                    Some(e) => Err(e),
                    None => self
                        .walker
                        .check_leaf(b, &buf[off..off + crate::pdata::BLOCK_SIZE], 8),
                };
                match res {
                    Ok(node) => {
                        self.nr_entries[b as usize].store(node.nr_entries() as u8, Relaxed);
                        let is_root = self.root_leaves.binary_search(&b).is_ok();
                        if let Some(i) = self.walker.leaf_fill_issue(&node, is_root) {
                            w.fill_issues.push((b, i));
                        }
                        w.scan
                            .scan_leaf(b, &node, &mut runs, self.split.stripe_shift);
                    }
                    Err(e) => w.leaf_errors.push((b, e)),
                }
            }
            let theirs = &mut runs[1 - id];
            let sent = std::mem::replace(theirs, Vec::with_capacity(theirs.len()));
            // A send fails only when the other worker is gone (a panic,
            // passed on when it is joined).
            if !sent.is_empty() {
                to_other.send(sent).ok();
            }
            count_runs(&mut w.counts, &runs[id]);
            runs[id].clear();
            while let Ok(r) = from_other.try_recv() {
                count_runs(&mut w.counts, &r);
            }
            let done = self.done.fetch_add(chunk.len() as u64, Relaxed) + chunk.len() as u64;
            progress(done);
        }
        drop(to_other);
        for r in from_other {
            count_runs(&mut w.counts, &r);
        }
        w
    }
}

/// Both space maps as loaded, with what loading found and the references
/// their own blocks hold (tree nodes, bitmaps, index blocks).
struct LoadedSpaceMaps {
    data: DiskSpaceMap,
    data_errors: Vec<PError>,
    metadata: DiskSpaceMap,
    metadata_errors: Vec<PError>,
    counts: RefCounts,
    /// Data counts for the two leaf workers, made ready (see
    /// [`prepared_leaf_counts`]) when loading was asked to.
    leaf_counts: Option<[RefCounts; 2]>,
}

/// Load both space maps of `sb` with a walker of their own; with
/// `(stripe_shift, walk_done)`, also prepare the leaf workers' data counts
/// for stripes of that size until the walk is done.
fn load_space_maps(
    dev: &BlockDevice,
    sb: &Superblock,
    prepare: Option<(u32, &AtomicBool)>,
) -> LoadedSpaceMaps {
    let mut walker = Walker::new(dev).with_ref_counts();
    let (data, data_errors) = DiskSpaceMap::load_data(&mut walker, sb.data_sm());
    let (metadata, metadata_errors) = DiskSpaceMap::load_metadata(&mut walker, sb.metadata_sm());
    let counts = walker
        .take_ref_counts()
        .unwrap_or_else(|| RefCounts::new(dev.nr_blocks()));
    let leaf_counts = prepare
        .map(|(shift, done)| prepared_leaf_counts(&data, sb.data_sm().nr_blocks, shift, done));
    LoadedSpaceMaps {
        data,
        data_errors,
        metadata,
        metadata_errors,
        counts,
        leaf_counts,
    }
}

/// Data counts for leaf workers 0 and 1 (worker `id` counts the stripes
/// of `1 << stripe_shift` blocks of parity `id`), each with the slabs it
/// will count in allocated and faulted in: those of its stripes the data
/// space map's index says hold allocated blocks. Done by the space-map
/// thread while the walk goes on: otherwise the kernel zeroes those
/// hundreds of MiB (huge pages) inside the leaf workers' first counts.
/// Once `walk_done` is set the rest is left to counting as it goes, so the
/// walk never waits for this.
fn prepared_leaf_counts(
    data_sm: &DiskSpaceMap,
    nr_data_blocks: u64,
    stripe_shift: u32,
    walk_done: &AtomicBool,
) -> [RefCounts; 2] {
    let owns = |id: usize, r: &std::ops::Range<u64>| {
        r.start >> stripe_shift != (r.end - 1) >> stripe_shift
            || ((r.start >> stripe_shift) & 1) as usize == id
    };
    let mut counts = [
        RefCounts::new(nr_data_blocks),
        RefCounts::new(nr_data_blocks),
    ];
    let slabs: Vec<_> = counts[0].slab_ranges().collect();
    for r in slabs
        .into_iter()
        .filter(|r| data_sm.any_allocated(r.clone()))
    {
        for (id, c) in counts.iter_mut().enumerate() {
            if walk_done.load(Relaxed) {
                return counts;
            }
            if owns(id, &r) {
                c.prefault_slab(r.start);
            }
        }
    }
    counts
}

struct DeviceWalk {
    dev: ThinDevice,
    leaves: TreeLeaves,
    /// "" for the live metadata, "metadata snapshot: " for the snapshot's.
    prefix: &'static str,
}

/// Check the metadata on `dev`. `progress(done, total)` is called while
/// mapping leaves are read.
pub fn check(
    dev: &BlockDevice,
    opts: &CheckOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> CheckReport {
    check_split(dev, opts, progress, SPLIT)
}

fn check_split(
    dev: &BlockDevice,
    opts: &CheckOptions,
    progress: &mut dyn FnMut(u64, u64),
    split: Split,
) -> CheckReport {
    let mut report = CheckReport::default();
    let mut sb = match read_superblock(dev, SUPERBLOCK_LOCATION) {
        Ok(sb) => sb,
        Err(e) => {
            superblock_failure(dev, &mut report, &e);
            return report;
        }
    };
    report.superblock = Some(sb.clone());
    if let Some(r) = opts.override_mapping_root {
        sb.mapping_root = r;
    }
    if let Some(r) = opts.override_details_root {
        sb.details_root = r;
    }
    check_superblock_fields(dev, &sb, opts.sb_only, &mut report);
    if opts.sb_only && !opts.metadata_snap {
        // Block 0 alone: a device truncated to its superblock passes.
        return report;
    }

    let snap = (sb.metadata_snap != 0).then(|| read_superblock(dev, sb.metadata_snap));
    if opts.metadata_snap {
        // As the peer: without a usable snapshot, -m prints no summary keys.
        if !matches!(snap, Some(Ok(_))) {
            report.superblock = None;
        }
        match &snap {
            None => {
                report.add(
                    Severity::Fatal,
                    "superblock",
                    "no metadata snapshot is held (metadata_snap is 0)",
                );
                return report;
            }
            Some(Err(e)) => {
                report.fatal(
                    format!("metadata snapshot superblock (block {})", sb.metadata_snap),
                    e,
                );
                return report;
            }
            Some(Ok(_)) => {}
        }
    }
    if opts.sb_only || report.has_fatal() {
        return report;
    }

    let mut walker = Walker::new(dev).with_ref_counts();
    walker.inc_ref(SUPERBLOCK_LOCATION);
    walker.mark_seen(SUPERBLOCK_LOCATION);
    if sb.metadata_snap != 0 && sb.metadata_snap < dev.nr_blocks() {
        walker.inc_ref(sb.metadata_snap);
        walker.mark_seen(sb.metadata_snap);
    }

    // Device lists of the live metadata and of the metadata snapshot.
    let mut devices: Vec<(ThinDevice, &'static str)> = Vec::new();
    let mut lists = Vec::new();
    if !opts.metadata_snap {
        lists.push((&sb, ""));
    }
    let snap_sb = match &snap {
        Some(Ok(s)) => Some(s.clone()),
        Some(Err(e)) => {
            if !opts.skip_mappings {
                report.fatal(
                    format!("metadata snapshot superblock (block {})", sb.metadata_snap),
                    e,
                );
            }
            None
        }
        None => None,
    };
    if !opts.skip_mappings {
        if let Some(s) = &snap_sb {
            lists.push((s, "metadata snapshot: "));
        }
    }
    for (s, prefix) in lists {
        let ds = Devices::read(&mut walker, s, false);
        for (tree, i) in &ds.issues {
            report.issue(format!("{prefix}{tree}"), i);
        }
        let (joined, errs) = ds.joined();
        for e in errs {
            report.add(Severity::Fatal, format!("{prefix}device details tree"), e);
        }
        devices.extend(joined.into_iter().map(|d| (d, prefix)));
    }
    if opts.skip_mappings || report.has_fatal() {
        return report;
    }

    // Walk every mapping tree; shared subtrees are walked once. The space
    // maps do not depend on the mapping trees: a second thread loads them
    // meanwhile (their trees walked, their leaves validated and their
    // blocks counted by a walker of its own), so neither serial part waits
    // for the other.
    // Set when the walk is done: the space-map thread stops preparing.
    let walk_done = AtomicBool::new(false);
    let (walks, mut loaded) = std::thread::scope(|scope| {
        let sb = &sb;
        let walk_done = &walk_done;
        let loading = if opts.metadata_snap
            || !split.second_thread
            || sb.metadata_sm().nr_allocated < split.space_map_thread_from
        {
            None
        } else {
            // First the memory of the walker's leaf ranges is faulted in,
            // ahead of the walk's first touches.
            let leaf_bounds = walker.leaf_bounds_memory();
            std::thread::Builder::new()
                .spawn_scoped(scope, move || {
                    if let Some(p) = leaf_bounds {
                        p.run();
                    }
                    load_space_maps(dev, sb, Some((split.stripe_shift, walk_done)))
                })
                .ok()
        };
        let mut walks = Vec::with_capacity(devices.len());
        for (d, prefix) in devices {
            let before = walker.issues.len();
            let leaves = walker.walk(d.root, 8);
            for i in walker.issues.drain(before..).collect::<Vec<_>>() {
                report.issue(format!("{prefix}mapping tree of device {}", d.id), &i);
            }
            walks.push(DeviceWalk {
                dev: d,
                leaves,
                prefix,
            });
        }
        walk_done.store(true, Relaxed);
        let loaded = match loading.map(|h| h.join()) {
            Some(Ok(l)) => Some(l),
            Some(Err(p)) => std::panic::resume_unwind(p),
            None => None,
        };
        (walks, loaded)
    });

    // Read each distinct leaf once, in block order: count data references.
    let nr_data_blocks = sb.data_sm().nr_blocks;
    // Sorted and distinct through a bitset over the device's blocks:
    // cheaper than sorting millions of leaves.
    // Written back into the walk's own list: tens of MiB on a large pool
    // that need no fresh pages.
    let fresh: Vec<u64> = {
        let mut leaves = walker.take_fresh_leaves();
        let mut set = fixedbitset::FixedBitSet::with_capacity(dev.nr_blocks() as usize);
        for &b in &leaves {
            if b < dev.nr_blocks() {
                set.insert(b as usize);
            }
        }
        leaves.clear();
        leaves.extend(set.ones().map(|b| b as u64));
        leaves
    };
    let mut root_leaves: Vec<u64> = walks
        .iter()
        .filter(|w| w.leaves.len() == 1 && walker.leaves(&w.leaves)[0] == w.dev.root)
        .map(|w| w.dev.root)
        .collect();
    root_leaves.sort_unstable();
    // Per leaf block: its number of entries; u8::MAX = unread or damaged.
    let nr_entries: Vec<AtomicU8> = (0..dev.nr_blocks())
        .map(|_| AtomicU8::new(u8::MAX))
        .collect();
    let total = fresh.len() as u64;
    let done = AtomicU64::new(0);
    let ctx = LeafContext {
        dev,
        walker: &walker,
        root_leaves: &root_leaves,
        nr_entries: &nr_entries,
        nr_data_blocks,
        sb_time: sb.time,
        split,
        done: &done,
    };
    // Two threads, each reading and validating every other batch of leaves
    // (pread, checksum, node checks, key ranges) and turning its mappings
    // into runs of data blocks. Each counts the runs that fall into its own
    // stripes of the data device and sends the others' runs across (8
    // bytes a run): so both cores share the reading and the counting, which
    // is bound by memory latency (fragmented data), and each count has one
    // writer.
    let batches = fresh.chunks(split.leaf_batch);
    // Worker 0 (this thread) takes the even batches and counts the even
    // stripes, worker 1 the odd ones.
    let [even_counts, odd_counts] = loaded
        .as_mut()
        .and_then(|l| l.leaf_counts.take())
        .unwrap_or_else(|| {
            [
                RefCounts::new(nr_data_blocks),
                RefCounts::new(nr_data_blocks),
            ]
        });
    let (to_odd, from_even) = std::sync::mpsc::channel::<Vec<u64>>();
    let (to_even, from_odd) = std::sync::mpsc::channel::<Vec<u64>>();
    let (even, odd) = std::thread::scope(|scope| {
        let ctx = &ctx;
        let odd_batches = batches.clone().skip(1).step_by(2);
        let spawned = if split.second_thread {
            std::thread::Builder::new()
                .spawn_scoped(scope, move || {
                    ctx.work(1, odd_counts, odd_batches, to_even, from_even, &mut |_| {})
                })
                .ok()
        } else {
            None
        };
        match spawned {
            Some(odd) => {
                let even = ctx.work(
                    0,
                    even_counts,
                    batches.step_by(2),
                    to_odd,
                    from_odd,
                    &mut |d| progress(d, total),
                );
                (even, odd.join().map(Some))
            }
            None => {
                // No second thread (a process limit): this one takes every
                // batch and every stripe (the odd stripes' prepared counts
                // went with the closure that never ran: they are made anew
                // as counted).
                let alone = LeafContext {
                    split: Split {
                        stripe_shift: 63,
                        ..split
                    },
                    ..*ctx
                };
                // A channel of its own: with one stripe nothing is sent,
                // and its end is not held by a closure that never ran.
                let (to_self, from_self) = std::sync::mpsc::channel::<Vec<u64>>();
                let all = alone.work(
                    0,
                    even_counts,
                    batches.step_by(1),
                    to_self,
                    from_self,
                    &mut |d| progress(d, total),
                );
                (all, Ok(None))
            }
        }
    });
    progress(total, total);
    let odd = match odd {
        Ok(u) => u,
        Err(p) => std::panic::resume_unwind(p),
    };
    let LeafWork {
        counts: mut data_counts,
        mut scan,
        mut leaf_errors,
        mut fill_issues,
    } = even;
    if let Some(odd) = odd {
        data_counts.absorb(odd.counts);
        leaf_errors.extend(odd.leaf_errors);
        fill_issues.extend(odd.fill_issues);
        scan = scan.merge(odd.scan);
    }
    leaf_errors.sort_by_key(|(b, _)| *b);
    fill_issues.sort_by_key(|(b, _)| *b);
    let DataScan {
        nr_beyond,
        beyond,
        nr_future,
        future,
        ..
    } = scan;
    let nr_entries: Vec<u8> = nr_entries.into_iter().map(AtomicU8::into_inner).collect();

    // Name the device a damaged leaf belongs to.
    let owner = |leaf: u64| -> String {
        walks
            .iter()
            .find(|w| walker.leaves(&w.leaves).contains(&leaf))
            .map(|w| format!("{}mapping tree of device {}", w.prefix, w.dev.id))
            .unwrap_or_else(|| "mapping tree".into())
    };
    for (b, e) in &leaf_errors {
        report.fatal(owner(*b), e);
    }
    // A tree that lost leaves cannot be counted; the space maps would only repeat the damage.
    for (b, i) in &fill_issues {
        report.issue(owner(*b), i);
    }
    for (leaf, key, block) in &beyond {
        report.add(
            Severity::Fatal,
            owner(*leaf),
            format!("block {leaf}: virtual block {key} maps to data block {block}, beyond the {nr_data_blocks}-block data device"),
        );
    }
    if nr_beyond > beyond.len() as u64 {
        report.add(
            Severity::Fatal,
            "mapping tree",
            format!(
                "{} more mappings point beyond the data device",
                nr_beyond - beyond.len() as u64
            ),
        );
    }
    for (leaf, key, time) in &future {
        report.add(
            Severity::NonFatal,
            owner(*leaf),
            format!("block {leaf}: virtual block {key} was written at time {time}, after the pool's time {}", sb.time),
        );
    }
    if nr_future > future.len() as u64 {
        report.add(
            Severity::NonFatal,
            "mapping tree",
            format!(
                "{} more mappings carry a time after the pool's",
                nr_future - future.len() as u64
            ),
        );
    }

    // Mapped block counts per device, and device times.
    let damaged: HashSet<u64> = leaf_errors.iter().map(|(b, _)| *b).collect();
    for w in &walks {
        let seq = walker.leaves(&w.leaves);
        if let Some(&l) = seq.iter().find(|&&l| nr_entries[l as usize] == u8::MAX) {
            // An unread leaf is damage already reported, or a block another
            // structure reached first (a superblock, a device-details or
            // top-level node): no device walk read it as fresh. Only the
            // space-map comparison would catch that, and `-m` has none.
            if !damaged.contains(&l) {
                report.add(
                    Severity::Fatal,
                    format!("{}mapping tree of device {}", w.prefix, w.dev.id),
                    format!("block {l} is both a mapping leaf and a superblock or a node of another tree"),
                );
            }
            continue;
        }
        let held: u64 = seq.iter().map(|&l| nr_entries[l as usize] as u64).sum();
        let d = &w.dev;
        let area = format!("{}device details of device {}", w.prefix, d.id);
        if held != d.details.mapped_blocks {
            report.add(
                Severity::Fatal,
                area.clone(),
                format!(
                    "mapped_blocks is {}, but its mapping tree holds {held} mappings",
                    d.details.mapped_blocks
                ),
            );
        }
        if d.details.creation_time > sb.time || d.details.snapshotted_time > sb.time {
            report.add(
                Severity::NonFatal,
                area,
                format!(
                    "creation time {} / snapshot time {} after the pool's time {}",
                    d.details.creation_time, d.details.snapshotted_time, sb.time
                ),
            );
        }
    }

    if opts.metadata_snap || report.has_fatal() {
        return report;
    }

    // The trees' metadata counts, before the space maps add their own
    // blocks (small: a copy; the data counts are moved in at the end).
    let tree_counts = if opts.keep_counts {
        walker.ref_counts().cloned()
    } else {
        None
    };

    // Space maps: loaded beside the walk (here when no thread could be
    // started), their blocks' counts added to the trees', then compared.
    let LoadedSpaceMaps {
        data: data_sm,
        data_errors,
        metadata: meta_sm,
        metadata_errors,
        counts: sm_counts,
        ..
    } = loaded.unwrap_or_else(|| load_space_maps(dev, &sb, None));
    for e in &data_errors {
        report.fatal("data space map", e);
    }
    for e in &metadata_errors {
        report.fatal("metadata space map", e);
    }
    if report.has_fatal() {
        return report;
    }
    let diff = data_sm.compare(dev, &data_counts);
    report.data_leaks = diff.nr_leaked;
    report_diff(&mut report, SmKind::Data, &diff);
    let mut meta_counts = walker
        .take_ref_counts()
        .unwrap_or_else(|| RefCounts::new(dev.nr_blocks()));
    meta_counts.absorb(sm_counts);
    if meta_sm.root.nr_blocks > dev.nr_blocks() {
        report.add(
            Severity::Fatal,
            "metadata space map",
            format!(
                "describes {} blocks but the device has {}",
                meta_sm.root.nr_blocks,
                dev.nr_blocks()
            ),
        );
    }
    let diff = meta_sm.compare(dev, &meta_counts);
    report.metadata_leaks = diff.nr_leaked;
    report_diff(&mut report, SmKind::Metadata, &diff);
    report.counts = tree_counts.map(|metadata| Counts {
        metadata,
        data: data_counts,
    });
    report
}

/// The superblock could not be read. When its checksum fails, say so in
/// the words scripts look for ("bad checksum in superblock"), with what the
/// block holds instead.
fn superblock_failure(dev: &BlockDevice, report: &mut CheckReport, e: &PError) {
    use crate::pdata::checksum::{verify, BlockKind};
    use crate::pdata::error::Problem;
    let mut block = vec![0u8; crate::pdata::BLOCK_SIZE];
    let bad_checksum = dev.read_block(SUPERBLOCK_LOCATION, &mut block).is_ok()
        && !verify(&block, BlockKind::ThinSuperblock);
    let PError::Corrupt { block, problem } = e else {
        report.fatal("superblock", e);
        return;
    };
    if !bad_checksum {
        report.fatal("superblock", e);
        return;
    }
    let what = match problem {
        Problem::BadChecksum { found: None, .. } => "the block is no known metadata block".into(),
        Problem::BadChecksum { found: Some(k), .. } => format!("the block holds a {k}"),
        p => p.to_string(),
    };
    report.add(
        Severity::Fatal,
        "superblock",
        format!("block {block}: bad checksum in superblock ({what})"),
    );
}

/// Fields of the superblock that must agree with each other and, unless
/// only the superblock is checked (`sb_only`), with the device's size.
fn check_superblock_fields(
    dev: &BlockDevice,
    sb: &Superblock,
    sb_only: bool,
    report: &mut CheckReport,
) {
    for (kind, r) in [("metadata", sb.metadata_sm()), ("data", sb.data_sm())] {
        if r.nr_allocated > r.nr_blocks {
            let msg = format!(
                "{kind} space map has {} of {} blocks allocated",
                r.nr_allocated, r.nr_blocks
            );
            report.add(Severity::Fatal, "superblock", msg);
        }
        if sb_only {
            continue;
        }
        // Each 16320 blocks need a bitmap block on this device: a larger
        // count is damage (and would make the recomputed counts unbounded).
        if r.nr_bitmaps() > dev.nr_blocks() {
            let msg = format!(
                "{kind} space map claims {} blocks; their bitmaps cannot fit the {}-block metadata device",
                r.nr_blocks,
                dev.nr_blocks()
            );
            report.add(Severity::Fatal, "superblock", msg);
        }
    }
    if sb_only {
        return;
    }
    for (name, b) in [
        ("mapping root", sb.mapping_root),
        ("details root", sb.details_root),
        ("metadata snapshot", sb.metadata_snap),
    ] {
        if b >= dev.nr_blocks() {
            report.add(
                Severity::Fatal,
                "superblock",
                format!(
                    "{name} {b} is beyond the end of the device ({} blocks)",
                    dev.nr_blocks()
                ),
            );
        }
    }
}

fn report_diff(report: &mut CheckReport, kind: SmKind, diff: &SmDiff) {
    let area = format!("{kind} space map");
    for e in &diff.errors {
        report.fatal(area.clone(), e);
    }
    if diff.nr_leaked > 0 {
        let list = listed(
            diff.leaked.iter().map(|(b, c)| format!("{b} (count {c})")),
            diff.nr_leaked,
        );
        let msg = format!(
            "{} {kind} blocks have leaked (counted but referenced by nothing): {list}",
            diff.nr_leaked
        );
        report.add(Severity::NonFatal, area.clone(), msg);
        report.space_map_findings += 1;
    }
    if diff.nr_mismatched > 0 {
        let list = listed(
            diff.mismatched
                .iter()
                .map(|(b, disk, want)| format!("{b} (counted {disk}, referenced {want})")),
            diff.nr_mismatched,
        );
        let msg = format!(
            "{} {kind} blocks have wrong reference counts: {list}",
            diff.nr_mismatched
        );
        report.add(Severity::Fatal, area.clone(), msg);
    }
    for w in &diff.warnings {
        report.add(Severity::NonFatal, area.clone(), w.clone());
        report.space_map_findings += 1;
    }
}

/// "a, b, c" or "a, b, c, ..." when `total` exceeds the listed items.
fn listed(items: impl Iterator<Item = String>, total: u64) -> String {
    let v: Vec<String> = items.collect();
    let more = if total > v.len() as u64 { ", ..." } else { "" };
    format!("{}{more}", v.join(", "))
}

/// Replace both space maps of `dev` with ones built from `counts` (what a
/// check recomputed from the trees): the fix for leaked blocks. New space-map
/// blocks go where neither the old space maps nor the trees are, and the
/// superblock is written last, so a crash leaves the old metadata whole.
/// Returns the new superblock.
pub fn rebuild_space_maps(
    dev: &BlockDevice,
    checked: &Superblock,
    counts: Counts,
    flags: u32,
) -> crate::pdata::Result<Superblock> {
    use crate::pdata::space_map::{write_data_sm, write_metadata_sm};
    use crate::pdata::writer::BlockWriter;
    use crate::thin::restore::{commit, OldMetadata};

    let old = match OldMetadata::probe(dev) {
        OldMetadata::Protect(set) => set,
        _ => {
            return Err(crate::pdata::Error::Other(
                "the metadata space map cannot be read; use thin_repair".into(),
            ))
        }
    };
    let mut meta = counts.metadata;
    if meta.nr_blocks() != checked.metadata_sm().nr_blocks {
        return Err(crate::pdata::Error::Other(
            "recomputed counts do not match the metadata space map size".into(),
        ));
    }
    if meta.get(SUPERBLOCK_LOCATION) == 0 {
        meta.inc(SUPERBLOCK_LOCATION);
    }
    let mut w = BlockWriter::with_counts(dev, meta, old);
    let data_sm = write_data_sm(&mut w, &counts.data)?;
    let metadata_sm = write_metadata_sm(&mut w)?;
    let sb = Superblock {
        flags,
        data_sm_root: Superblock::sm_root_bytes(&data_sm),
        metadata_sm_root: Superblock::sm_root_bytes(&metadata_sm),
        ..checked.clone()
    };
    commit(&mut w, &sb)?;
    Ok(sb)
}

/// For writers that change metadata in place (thin_message, thin_merge
/// --into-thin): the metadata must pass a full check first. A transaction
/// trusts the space maps to tell which blocks are in use; an under-counted
/// block would be handed out and overwritten. Leaks are harmless here (a
/// leaked block only looks in use). Returns the first fatal finding.
pub fn require_sound(dev: &BlockDevice) -> std::result::Result<(), String> {
    let report = check(dev, &CheckOptions::default(), &mut |_, _| {});
    match report
        .findings
        .iter()
        .find(|f| f.severity == Severity::Fatal)
    {
        None => Ok(()),
        Some(f) => Err(format!(
            "the metadata does not pass thin_check ({}: {}); run thin_check and thin_repair first",
            f.area, f.message
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::btree::{Node, NODE_HEADER_SIZE};

    /// A leaf's bytes as `Node::validated` reads them: header, keys, values.
    fn leaf(values: &[u64], max: usize) -> Vec<u8> {
        let mut b = vec![0u8; crate::pdata::BLOCK_SIZE];
        b[4..8].copy_from_slice(&2u32.to_le_bytes());
        b[16..20].copy_from_slice(&(values.len() as u32).to_le_bytes());
        b[20..24].copy_from_slice(&(max as u32).to_le_bytes());
        b[24..28].copy_from_slice(&8u32.to_le_bytes());
        for (i, v) in values.iter().enumerate() {
            let k = NODE_HEADER_SIZE + 8 * i;
            b[k..k + 8].copy_from_slice(&(3 * i as u64).to_le_bytes());
            let o = NODE_HEADER_SIZE + 8 * max + 8 * i;
            b[o..o + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    /// Both ways of finding run starts agree, on every length of leaf
    /// (the vector loop's tail included), runs cut everywhere, and bad
    /// values in every lane (a data device of 0 blocks too).
    #[test]
    fn run_starts_agree_with_and_without_avx2() {
        let mut x = 0x5eed_1234_abcd_0001u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut bad_seen = 0;
        for round in 0..20_000usize {
            let n = 1 + round % MAX_LEAF_ENTRIES;
            let nr_data = [0u64, 1, 1000, 1 << 39][round % 4];
            let sb_time = (next() % 20) as u32;
            let mut block = next() % 1200;
            let mut values = Vec::with_capacity(8 * n);
            for _ in 0..n {
                block = match next() % 9 {
                    0 => next() % 1200,
                    1 => block.wrapping_sub(1) & ((1 << 40) - 1),
                    2 => block,
                    _ => block + 1,
                };
                let time = if next() % 300 == 0 {
                    sb_time as u64 + 1
                } else {
                    next() % (sb_time as u64 + 1)
                };
                values.extend_from_slice(&(block << 24 | time).to_le_bytes());
            }
            let (mut a, mut b) = ([0u32; MAX_LEAF_ENTRIES + 1], [0u32; MAX_LEAF_ENTRIES + 1]);
            let (ka, bad_a) = run_starts_scalar(&values, nr_data, sb_time, &mut a);
            let (kb, bad_b) = run_starts(&values, nr_data, sb_time, &mut b);
            assert_eq!((ka, bad_a), (kb, bad_b), "round {round}");
            assert_eq!(a[..ka], b[..kb], "round {round}");
            bad_seen += bad_a as usize;
        }
        assert!(bad_seen > 1000 && bad_seen < 19_000, "{bad_seen}");
    }

    /// A pool restored from XML onto a temporary file of `blocks` blocks.
    fn pool(xml: String, blocks: u64) -> tempfile::NamedTempFile {
        use crate::pdata::io::OpenMode;
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file()
            .set_len(blocks * crate::pdata::BLOCK_SIZE as u64)
            .unwrap();
        let dev = BlockDevice::open(f.path(), OpenMode::ReadWriteExclusive).unwrap();
        crate::thin::restore::restore_xml(&dev, Default::default(), |_| {
            Ok(Box::new(std::io::Cursor::new(xml.clone().into_bytes()))
                as Box<dyn std::io::Read + Send>)
        })
        .unwrap();
        f
    }

    /// The two leaf workers, taking alternate leaves and sending each other
    /// the runs in the other's stripes, report what one worker taking every
    /// leaf reports, and count the same: a pool with shared and scattered
    /// data, then leaves with a bad checksum, blocks beyond the data device
    /// and times after the pool's in leaves of both workers.
    #[test]
    fn two_workers_check_as_one() {
        use crate::pdata::checksum::{seal, BlockKind};
        use crate::pdata::io::OpenMode;
        use std::os::unix::fs::FileExt;
        let nr_data = 40_000u64;
        let mut xml = format!(
            "<superblock uuid=\"\" time=\"5\" transaction=\"1\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"{nr_data}\">\n"
        );
        let mut x = 0x1234_5678_9abc_def1u64;
        for dev in 0..3u64 {
            xml += &format!("<device dev_id=\"{dev}\" mapped_blocks=\"3000\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n");
            let mut block = 0u64;
            for v in 0..3000u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                // Runs of a few blocks at scattered places; devices 1 and 2
                // share some of device 0's blocks.
                block = if x % 5 == 0 {
                    x % (nr_data - 1)
                } else {
                    (block + 1) % nr_data
                };
                xml += &format!(
                    "<single_mapping origin_block=\"{v}\" data_block=\"{block}\" time=\"{}\"/>\n",
                    x % 6
                );
            }
            xml += "</device>\n";
        }
        xml += "</superblock>\n";
        let f = pool(xml, 400);
        let alone = Split {
            leaf_batch: 3,
            stripe_shift: 4,
            second_thread: false,
            space_map_thread_from: 0,
        };
        let one = Split {
            leaf_batch: 1 << 20,
            stripe_shift: 63,
            second_thread: true,
            space_map_thread_from: u64::MAX,
        };
        let two = Split {
            leaf_batch: 1,
            stripe_shift: 4,
            second_thread: true,
            space_map_thread_from: 0,
        };
        let opts = CheckOptions {
            keep_counts: true,
            ..Default::default()
        };
        let same = |what: &str| {
            let dev = BlockDevice::open(f.path(), OpenMode::ReadOnly).unwrap();
            let a = check_split(&dev, &opts, &mut |_, _| {}, one);
            // Two threads, and one thread taking both workers' batches (as
            // when the second thread cannot be started); `one` loads the
            // space maps after the walk, `two` beside it.
            for split in [two, alone] {
                let b = check_split(&dev, &opts, &mut |_, _| {}, split);
                assert_eq!(
                    format!("{:?}", a.findings),
                    format!("{:?}", b.findings),
                    "{what} {split:?}"
                );
                assert_eq!(
                    (a.data_leaks, a.metadata_leaks),
                    (b.data_leaks, b.metadata_leaks)
                );
                if let (Some(ca), Some(cb)) = (&a.counts, &b.counts) {
                    for blk in 0..nr_data {
                        assert_eq!(
                            ca.data.get(blk),
                            cb.data.get(blk),
                            "{what} {split:?}: data block {blk}"
                        );
                    }
                }
            }
            a
        };
        let clean = same("clean pool");
        assert!(clean.findings.is_empty(), "{:?}", clean.findings);
        assert!((0..nr_data).any(|b| clean.counts.as_ref().unwrap().data.get(b) > 1));

        // Damage mapping leaves (the leaves with many entries), every third
        // one in turn: beyond the data device, a time after the pool's, a
        // bad checksum.
        let mut img = std::fs::read(f.path()).unwrap();
        let bs = crate::pdata::BLOCK_SIZE;
        let mut leaves = Vec::new();
        for b in 1..img.len() / bs {
            let data = &img[b * bs..(b + 1) * bs];
            if let Ok(n) = crate::pdata::btree::Node::parse(b as u64, data, 8) {
                if n.is_leaf() && n.nr_entries() > 10 {
                    leaves.push(b);
                }
            }
        }
        assert!(leaves.len() > 12, "{} leaves", leaves.len());
        for (i, &b) in leaves.iter().enumerate() {
            let blk = &mut img[b * bs..(b + 1) * bs];
            let max = u32::from_le_bytes(blk[20..24].try_into().unwrap()) as usize;
            let v = NODE_HEADER_SIZE + 8 * max + 8 * (i % 7);
            let bt = BlockTime::unpack(u64::from_le_bytes(blk[v..v + 8].try_into().unwrap()));
            let value = match i % 3 {
                0 => (nr_data + i as u64) << 24 | bt.time as u64,
                1 => bt.block << 24 | 9,
                _ => {
                    blk[100] ^= 1;
                    continue;
                }
            };
            blk[v..v + 8].copy_from_slice(&value.to_le_bytes());
            seal(blk, BlockKind::BTreeNode);
        }
        f.as_file().write_all_at(&img, 0).unwrap();
        let damaged = same("damaged leaves");
        let text = format!("{:?}", damaged.findings);
        assert!(
            text.contains("beyond the")
                && text.contains("after the pool")
                && text.contains("checksum"),
            "{text}"
        );
        assert!(text.contains("more mappings point beyond"), "{text}");
    }

    /// The runs a leaf is scanned into count exactly what counting each
    /// mapping alone counts (blocks beyond the data device ignored), and
    /// the bad values are listed as a plain loop lists them: full leaves of
    /// the largest size any node can have, runs cut at every place, values
    /// beyond the device and times after the pool's.
    #[test]
    fn scanned_runs_count_every_mapping_once() {
        let nr_data = 5000u64;
        let sb_time = 7u32;
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut scan = DataScan::new(nr_data, sb_time);
        let mut runs_counts = RefCounts::new(nr_data);
        let mut single = RefCounts::new(nr_data);
        let (mut beyond, mut future) = (Vec::new(), Vec::new());
        for leaf_no in 0..300u64 {
            let n = match leaf_no % 4 {
                0 => MAX_LEAF_ENTRIES,
                1 => 1,
                _ => (next() % MAX_LEAF_ENTRIES as u64) as usize,
            };
            let mut block = next() % nr_data;
            let values: Vec<u64> = (0..n)
                .map(|_| {
                    block = match next() % 10 {
                        0 => next() % nr_data,
                        1 if leaf_no % 7 == 0 => nr_data + next() % 3,
                        2 => block,
                        _ => block + 1,
                    };
                    let time = if next() % 50 == 0 {
                        sb_time + 1
                    } else {
                        (next() % 8) as u32
                    };
                    block << 24 | time as u64
                })
                .collect();
            let bytes = leaf(&values, MAX_LEAF_ENTRIES);
            let node = Node::validated(&bytes);
            // Stripes of 64 blocks: runs are cut at their boundaries.
            let mut runs = [Vec::new(), Vec::new()];
            scan.scan_leaf(leaf_no, &node, &mut runs, 6);
            for (parity, runs) in runs.iter().enumerate() {
                for &r in runs {
                    let (start, len) = (r >> RUN_LEN_BITS, r & MAX_RUN);
                    assert_eq!(((start >> 6) & 1) as usize, parity);
                    assert_eq!(start >> 6, (start + len - 1) >> 6, "run {start}+{len}");
                }
                count_runs(&mut runs_counts, runs);
            }
            for (i, &v) in values.iter().enumerate() {
                let bt = BlockTime::unpack(v);
                single.inc(bt.block);
                if bt.block >= nr_data {
                    beyond.push((leaf_no, 3 * i as u64, bt.block));
                } else if bt.time > sb_time {
                    future.push((leaf_no, 3 * i as u64, bt.time));
                }
            }
        }
        for b in 0..nr_data {
            assert_eq!(runs_counts.get(b), single.get(b), "block {b}");
        }
        assert!((0..nr_data).any(|b| single.get(b) > 2));
        assert_eq!(scan.nr_beyond, beyond.len() as u64);
        assert_eq!(scan.nr_future, future.len() as u64);
        assert!(beyond.len() > MAX_LISTED && future.len() > MAX_LISTED);
        beyond.truncate(MAX_LISTED);
        future.truncate(MAX_LISTED);
        assert_eq!((scan.beyond, scan.future), (beyond, future));
    }
}
