//! Space maps: the kernel's record of how many references each block has.
//!
//! Both kinds keep 2-bit counts in bitmap blocks (16320 entries each) with
//! counts of 3 or more in a separate ref-count btree (block -> u32). They
//! differ in how bitmaps are found: the data ("disk") space map indexes them
//! with a btree of [`IndexEntry`]s, the metadata space map with one index
//! block of up to 255 entries.

mod write;

pub use write::{write_data_sm, write_metadata_sm};

use crate::pdata::btree::{Value, Walker, NODE_HEADER_SIZE};
use crate::pdata::checksum::{self, BlockKind};
use crate::pdata::counts::RefCounts;
use crate::pdata::error::{Error, Result};
use crate::pdata::io::{BlockDevice, ReadScratch};
use crate::pdata::{le32, le64, BLOCK_SIZE};

/// Entries (blocks) described by one bitmap block: (4096 - 16) * 4.
pub const ENTRIES_PER_BITMAP: u64 = 16320;
/// The metadata space map's index block holds at most this many entries.
pub const MAX_METADATA_BITMAPS: usize = 255;
/// The largest metadata device the kernel uses, in blocks (~15.875 GiB).
pub const MAX_METADATA_BLOCKS: u64 = MAX_METADATA_BITMAPS as u64 * ENTRIES_PER_BITMAP;

const BITMAP_HEADER: usize = 16;
const INDEX_HEADER: usize = 16;
/// Size of the sm root area in the superblock (only the first 32 bytes are used).
pub const SM_ROOT_SIZE: usize = 128;

/// `disk_sm_root`: the first 32 bytes of each 128-byte space-map root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmRoot {
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    /// Data sm: root of the index btree. Metadata sm: the index block.
    pub bitmap_root: u64,
    pub ref_count_root: u64,
}

impl SmRoot {
    pub fn parse(b: &[u8]) -> SmRoot {
        SmRoot {
            nr_blocks: le64(b, 0),
            nr_allocated: le64(b, 8),
            bitmap_root: le64(b, 16),
            ref_count_root: le64(b, 24),
        }
    }

    pub fn nr_bitmaps(&self) -> u64 {
        self.nr_blocks.div_ceil(ENTRIES_PER_BITMAP)
    }
}

/// Index entry (16 bytes): where a bitmap lives and a free-space hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexEntry {
    pub blocknr: u64,
    pub nr_free: u32,
    pub none_free_before: u32,
}

impl Value for IndexEntry {
    const SIZE: usize = 16;
    fn decode(b: &[u8]) -> Self {
        IndexEntry {
            blocknr: le64(b, 0),
            nr_free: le32(b, 8),
            none_free_before: le32(b, 12),
        }
    }
}

/// A validated view of a bitmap block.
pub struct Bitmap<'a> {
    words: &'a [u8],
}

impl<'a> Bitmap<'a> {
    pub fn parse(loc: u64, data: &'a [u8]) -> Result<Bitmap<'a>> {
        checksum::validate(loc, data, BlockKind::Bitmap)?;
        Ok(Bitmap {
            words: &data[BITMAP_HEADER..BLOCK_SIZE],
        })
    }

    /// Word `w` (< 510) of the bitmap: 32 entries, on-disk bit order.
    #[inline(always)]
    pub fn word(&self, w: usize) -> u64 {
        le64(self.words, w * 8)
    }

    /// Entry `i` (< 16320): 0, 1, 2, or 3 meaning "look in the ref-count tree".
    /// Within each le64 word, entry j uses bits 2j and 2j+1 with the even bit
    /// as the high bit of the value.
    #[inline(always)]
    pub fn get(&self, i: usize) -> u32 {
        let w = le64(self.words, (i / 32) * 8);
        let shift = (i % 32) * 2;
        ((((w >> shift) & 1) << 1) | ((w >> (shift + 1)) & 1)) as u32
    }
}

/// Encode one entry into a bitmap word (the inverse of [`Bitmap::get`]).
pub fn bitmap_word_set(word: &mut u64, j: usize, v: u32) {
    let shift = j * 2;
    *word &= !(3u64 << shift);
    *word |= (((v as u64) >> 1) & 1) << shift;
    *word |= ((v as u64) & 1) << (shift + 1);
}

/// Which space map, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmKind {
    Data,
    Metadata,
}

impl std::fmt::Display for SmKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SmKind::Data => "data",
            SmKind::Metadata => "metadata",
        })
    }
}

/// An on-disk space map, loaded as far as needed to read any block's count:
/// its index entries and its ref-count tree. Bitmaps are read on comparison.
pub struct DiskSpaceMap {
    pub kind: SmKind,
    pub root: SmRoot,
    pub index: Vec<IndexEntry>,
    /// Leaves of the ref-count tree (counts of 3 or more), in key order.
    pub ref_count_leaves: Vec<u64>,
}

/// What comparing a space map with recomputed counts found.
#[derive(Debug, Default)]
pub struct SmDiff {
    /// Blocks the space map counts but nothing references: (block, on-disk count).
    pub leaked: Vec<(u64, u32)>,
    pub nr_leaked: u64,
    /// Blocks whose on-disk count differs from the references found, other
    /// than leaks: (block, on-disk, actual).
    pub mismatched: Vec<(u64, u32, u32)>,
    pub nr_mismatched: u64,
    /// Damaged bitmaps or index entries.
    pub errors: Vec<Error>,
    /// Problems the kernel tolerates (free-space hints): non-fatal.
    pub warnings: Vec<String>,
}

/// At most this many blocks are listed per kind of difference.
const MAX_LISTED: usize = 16;

impl SmDiff {
    pub fn is_clean(&self) -> bool {
        self.nr_leaked == 0 && self.nr_mismatched == 0 && self.errors.is_empty()
    }

    /// Add the differences of the blocks after this diff's (as one pass
    /// over both would have found them: lists keep their first entries).
    fn append(&mut self, later: SmDiff) {
        self.nr_leaked += later.nr_leaked;
        let room = MAX_LISTED.saturating_sub(self.leaked.len());
        self.leaked.extend(later.leaked.into_iter().take(room));
        self.nr_mismatched += later.nr_mismatched;
        let room = MAX_LISTED.saturating_sub(self.mismatched.len());
        self.mismatched
            .extend(later.mismatched.into_iter().take(room));
        self.errors.extend(later.errors);
        self.warnings.extend(later.warnings);
    }
}

/// Walk a ref-count tree, validating its nodes; returns its leaves in key
/// order (entries are streamed from them by [`RefCountCursor`]).
fn load_ref_count_tree(walker: &mut Walker, root: u64, errors: &mut Vec<Error>) -> Vec<u64> {
    walker.inc_ref(root);
    let before = walker.issues.len();
    let tree = walker.walk(root, u32::SIZE);
    for issue in walker.issues.drain(before..).collect::<Vec<_>>() {
        if issue.fatal {
            errors.push(issue.error);
        }
    }
    let leaves = walker.leaves(&tree).to_vec();
    let fresh = walker.take_fresh_leaves();
    let dev = walker.device();
    dev.read_in_order(&fresh, 256, |_, b, data| {
        if let Err(e) = data.and_then(|d| walker.check_leaf(b, d, u32::SIZE)) {
            errors.push(e);
        }
        Ok::<(), std::convert::Infallible>(())
    })
    .ok();
    leaves
}

/// Ref-count leaves a [`RefCountCursor`] reads at once.
const CURSOR_BATCH: usize = 64;

/// Whether ref-count entries (`keys`: little-endian u64 blocks, `counts`:
/// u32 counts, as many of each) are exactly the blocks `base + f` for the
/// fields `f` set in `fields` (bit `2f`), each counted as nibble `f` of
/// `nibbles` (15 never agrees): see [`RefCountCursor::agrees_with_word`].
/// Without a branch an entry: the entries' blocks as fields must make up
/// `fields` (as many entries as fields: the same set), and each count
/// equal its nibble. A pool with many snapshots compares tens of millions
/// of counts of 3 or more this way.
fn entries_agree(keys: &[u8], counts: &[u8], base: u64, fields: u64, nibbles: [u64; 2]) -> bool {
    let n = keys.len() / 8;
    if n != counts.len() / 4 || n != fields.count_ones() as usize {
        return false;
    }
    let mut done = 0;
    let (mut seen, mut bad) = (0u64, 0u64);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        (done, seen, bad) = unsafe { entries_agree_avx2(keys, counts, base, nibbles) };
    }
    for (k, c) in keys[8 * done..]
        .chunks_exact(8)
        .zip(counts[4 * done..].chunks_exact(4))
    {
        let f = u64::from_le_bytes(k.try_into().unwrap()).wrapping_sub(base);
        let nibble = (nibbles[(f as usize / 16) & 1] >> (4 * (f % 16))) & 15;
        let count = u64::from(u32::from_le_bytes(c.try_into().unwrap()));
        bad |= (f >> 5) | (count ^ nibble) | u64::from(nibble == 15);
        seen |= 1 << ((2 * f) & 63);
    }
    bad == 0 && seen == fields
}

/// The first entries of [`entries_agree`], four at a time: returns how
/// many it took (a multiple of four), their fields seen, and non-zero
/// when one of them disagrees.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn entries_agree_avx2(
    keys: &[u8],
    counts: &[u8],
    base: u64,
    nibbles: [u64; 2],
) -> (usize, u64, u64) {
    use std::arch::x86_64::*;
    let quads = (keys.len() / 32).min(counts.len() / 16);
    let vbase = _mm256_set1_epi64x(base as i64);
    let lo_n = _mm256_set1_epi64x(nibbles[0] as i64);
    let hi_n = _mm256_set1_epi64x(nibbles[1] as i64);
    let fifteen = _mm256_set1_epi64x(15);
    let sixteen = _mm256_set1_epi64x(16);
    let one = _mm256_set1_epi64x(1);
    let (mut seen, mut bad) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    for q in 0..quads {
        // SAFETY: keys 4q..4q+4 (32 bytes) and counts 4q..4q+4 (16 bytes)
        // lie inside the slices (q < quads); unaligned loads.
        let (k, c) = unsafe {
            (
                _mm256_loadu_si256(keys.as_ptr().add(32 * q).cast()),
                _mm_loadu_si128(counts.as_ptr().add(16 * q).cast()),
            )
        };
        let c = _mm256_cvtepu32_epi64(c);
        let f = _mm256_sub_epi64(k, vbase);
        // f of 32 or more (or below base, wrapped): bits above the low five.
        bad = _mm256_or_si256(bad, _mm256_srli_epi64::<5>(f));
        let shift = _mm256_slli_epi64::<2>(_mm256_and_si256(f, fifteen));
        let in_hi = _mm256_cmpeq_epi64(_mm256_and_si256(f, sixteen), sixteen);
        let word = _mm256_blendv_epi8(lo_n, hi_n, in_hi);
        let nibble = _mm256_and_si256(_mm256_srlv_epi64(word, shift), fifteen);
        bad = _mm256_or_si256(bad, _mm256_xor_si256(c, nibble));
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi64(nibble, fifteen));
        // Bit 2f (a shift of 64 or more gives 0; such an f is bad anyway).
        seen = _mm256_or_si256(seen, _mm256_sllv_epi64(one, _mm256_slli_epi64::<1>(f)));
    }
    let or_lanes = |v: __m256i| {
        let mut a = [0u64; 4];
        // SAFETY: 32 bytes into a 32-byte array.
        unsafe { _mm256_storeu_si256(a.as_mut_ptr().cast(), v) };
        a[0] | a[1] | a[2] | a[3]
    };
    (4 * quads, or_lanes(seen), or_lanes(bad))
}

/// Reads a ref-count tree's (block, count) entries in block order, a batch
/// of leaves at a time, for lookups in increasing block order. Entries are
/// read where they lie in the leaves' bytes (tens of millions of them in a
/// pool with many snapshots: copied out, they cost more than the lookups).
pub struct RefCountCursor<'a> {
    dev: &'a BlockDevice,
    leaves: &'a [u64],
    next_leaf: usize,
    /// The batch of leaves read: their blocks sorted, the bytes in `buf`
    /// in that order, and whether each read failed.
    sorted: Vec<u64>,
    buf: Vec<u8>,
    failed: Vec<Option<Error>>,
    /// The batch's slots in key order, and how many have been entered.
    order: Vec<usize>,
    entered: usize,
    /// The leaf being looked in: its byte offset in `buf`, its entries
    /// and max entries, and the entry lookups have reached.
    at: usize,
    nr: usize,
    max: usize,
    pos: usize,
}

impl<'a> RefCountCursor<'a> {
    pub fn new(dev: &'a BlockDevice, leaves: &'a [u64]) -> Self {
        RefCountCursor {
            dev,
            leaves,
            next_leaf: 0,
            sorted: Vec::new(),
            buf: Vec::new(),
            failed: Vec::new(),
            order: Vec::new(),
            entered: 0,
            at: 0,
            nr: 0,
            max: 0,
            pos: 0,
        }
    }

    /// A cursor for lookups from block `b` on: it starts at the last leaf
    /// whose first key is at most `b` (a binary search reading a few
    /// leaves), not at the first leaf. When a probed leaf cannot be read it
    /// starts at the first leaf, where the lookups report the damage.
    pub fn starting_at(dev: &'a BlockDevice, leaves: &'a [u64], b: u64) -> Self {
        let mut cursor = RefCountCursor::new(dev, leaves);
        let mut buf = vec![0u8; BLOCK_SIZE];
        let first_key = |leaf: u64, buf: &mut Vec<u8>| -> Option<u64> {
            dev.read_block(leaf, buf).ok()?;
            crate::pdata::btree::Node::parse(leaf, buf, u32::SIZE)
                .ok()?
                .first_key()
        };
        // Invariant: every leaf before `lo` starts at or below `b`.
        let (mut lo, mut hi) = (0usize, leaves.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match first_key(leaves[mid], &mut buf) {
                Some(k) if k <= b => lo = mid + 1,
                Some(_) => hi = mid,
                None => return cursor,
            }
        }
        cursor.next_leaf = lo.saturating_sub(1);
        cursor
    }

    /// Key `i` of the current leaf.
    #[inline(always)]
    fn key(&self, i: usize) -> u64 {
        le64(&self.buf, self.at + NODE_HEADER_SIZE + 8 * i)
    }

    /// Count `i` of the current leaf.
    #[inline(always)]
    fn count(&self, i: usize) -> u32 {
        le32(&self.buf, self.at + NODE_HEADER_SIZE + 8 * self.max + 4 * i)
    }

    /// The count stored for `b`; calls must come in increasing `b`.
    #[inline]
    pub fn get(&mut self, b: u64) -> Result<Option<u32>> {
        match self.get_near(b) {
            Some(c) => Ok(Some(c)),
            None => self.seek(b),
        }
    }

    /// The count stored for `b` when it is the entry found last or the
    /// one after it in the same leaf (the usual case: a consistent map has
    /// an entry for every count of 3 or more); None = look further.
    #[inline(always)]
    fn get_near(&mut self, b: u64) -> Option<u32> {
        if self.pos < self.nr {
            let k = self.key(self.pos);
            if k == b {
                return Some(self.count(self.pos));
            }
            if k < b && self.pos + 1 < self.nr && self.key(self.pos + 1) == b {
                self.pos += 1;
                return Some(self.count(self.pos));
            }
        }
        None
    }

    /// Whether the next entries of the current leaf are exactly the
    /// blocks `base + f` for the fields `f` set in `fields` (bit `2f`: a
    /// bitmap word's entries of "3 or more"), each with the count held by
    /// nibble `f` of `nibbles` (as [`RefCounts::wide_word`] gives them; 15,
    /// "look further", never agrees). On agreement the cursor is left at
    /// the last of them, as [`RefCountCursor::get`] of each would leave it;
    /// otherwise it is unmoved, for block-by-block lookups to find out.
    #[inline]
    pub fn agrees_with_word(&mut self, base: u64, fields: u64, nibbles: [u64; 2]) -> bool {
        let m = fields.count_ones() as usize;
        let first = base + u64::from(fields.trailing_zeros() / 2);
        let p0 = if self.pos < self.nr && self.key(self.pos) == first {
            self.pos
        } else if self.pos + 1 < self.nr && self.key(self.pos + 1) == first {
            self.pos + 1
        } else {
            return false;
        };
        if m == 0 || p0 + m > self.nr {
            return false;
        }
        let keys_at = self.at + NODE_HEADER_SIZE + 8 * p0;
        let counts_at = self.at + NODE_HEADER_SIZE + 8 * self.max + 4 * p0;
        let keys = &self.buf[keys_at..keys_at + 8 * m];
        let counts = &self.buf[counts_at..counts_at + 4 * m];
        if !entries_agree(keys, counts, base, fields, nibbles) {
            return false;
        }
        self.pos = p0 + m - 1;
        true
    }

    #[inline(never)]
    fn seek(&mut self, b: u64) -> Result<Option<u32>> {
        loop {
            while self.pos < self.nr && self.key(self.pos) < b {
                self.pos += 1;
            }
            if self.pos < self.nr {
                return Ok((self.key(self.pos) == b).then(|| self.count(self.pos)));
            }
            self.enter_next_leaf()?;
            if self.nr == 0
                && self.entered == self.order.len()
                && self.next_leaf >= self.leaves.len()
            {
                return Ok(None);
            }
        }
    }

    /// Make the next leaf in key order the current one, reading the next
    /// batch when this one is used up. A leaf that cannot be read or is
    /// not a valid ref-count leaf is passed over, reported once here.
    fn enter_next_leaf(&mut self) -> Result<()> {
        self.nr = 0;
        self.pos = 0;
        if self.entered == self.order.len() {
            if self.next_leaf >= self.leaves.len() {
                return Ok(());
            }
            // The next few leaves at once: fewer, larger reads.
            let end = (self.next_leaf + CURSOR_BATCH).min(self.leaves.len());
            let batch = &self.leaves[self.next_leaf..end];
            self.next_leaf = end;
            self.sorted.clear();
            self.sorted.extend_from_slice(batch);
            self.sorted.sort_unstable();
            self.sorted.dedup();
            if self.buf.len() < self.sorted.len() * BLOCK_SIZE {
                self.buf.resize(self.sorted.len() * BLOCK_SIZE, 0);
            }
            self.dev
                .read_sorted(&self.sorted, &mut self.buf, &mut self.failed);
            self.order.clear();
            for leaf in batch {
                // Present: `sorted` holds every leaf of the batch.
                if let Ok(slot) = self.sorted.binary_search(leaf) {
                    self.order.push(slot);
                }
            }
            self.entered = 0;
        }
        let slot = self.order[self.entered];
        self.entered += 1;
        if let Some(e) = self.failed[slot].clone() {
            return Err(e);
        }
        let at = slot * BLOCK_SIZE;
        let node = crate::pdata::btree::Node::parse(
            self.sorted[slot],
            &self.buf[at..at + BLOCK_SIZE],
            u32::SIZE,
        )?;
        (self.at, self.nr, self.max) = (at, node.nr_entries(), node.max_entries());
        Ok(())
    }
}

impl DiskSpaceMap {
    /// Load the data space map: walk its index btree and ref-count tree,
    /// counting every block it uses (tree nodes, bitmaps) in the walker.
    pub fn load_data(walker: &mut Walker, root: SmRoot) -> (DiskSpaceMap, Vec<Error>) {
        let mut errors = Vec::new();
        let want = root.nr_bitmaps();
        let mut index = Vec::new();
        walker.inc_ref(root.bitmap_root);
        let before = walker.issues.len();
        let tree = walker.walk(root.bitmap_root, IndexEntry::SIZE);
        for issue in walker.issues.drain(before..).collect::<Vec<_>>() {
            if issue.fatal {
                errors.push(issue.error);
            }
        }
        let leaves = walker.leaves(&tree).to_vec();
        walker.take_fresh_leaves();
        let dev = walker.device();
        let mut entries: Vec<(u64, IndexEntry)> = Vec::new();
        dev.read_in_order(&leaves, 256, |_, b, data| {
            match data.and_then(|d| walker.check_leaf(b, d, IndexEntry::SIZE)) {
                Ok(node) => entries.extend(node.entries::<IndexEntry>()),
                Err(e) => errors.push(e),
            }
            Ok::<(), std::convert::Infallible>(())
        })
        .ok();
        for (k, e) in entries {
            if k != index.len() as u64 {
                errors.push(Error::Other(format!(
                    "data space map index: entry for bitmap {k} found where bitmap {} was expected",
                    index.len()
                )));
                break;
            }
            index.push(e);
        }
        if index.len() as u64 != want && errors.is_empty() {
            errors.push(Error::Other(format!(
                "data space map index has {} bitmaps; {} blocks need {want}",
                index.len(),
                root.nr_blocks
            )));
        }
        for e in &index {
            walker.inc_ref(e.blocknr);
        }
        let ref_count_leaves = load_ref_count_tree(walker, root.ref_count_root, &mut errors);
        (
            DiskSpaceMap {
                kind: SmKind::Data,
                root,
                index,
                ref_count_leaves,
            },
            errors,
        )
    }

    /// Load the metadata space map: its index block and ref-count tree,
    /// counting the blocks it uses in the walker.
    pub fn load_metadata(walker: &mut Walker, root: SmRoot) -> (DiskSpaceMap, Vec<Error>) {
        let mut errors = Vec::new();
        let mut index = Vec::new();
        let loc = root.bitmap_root;
        walker.inc_ref(loc);
        let want = root.nr_bitmaps();
        if want > MAX_METADATA_BITMAPS as u64 {
            errors.push(Error::Other(format!(
                "metadata space map claims {} blocks, more than the {MAX_METADATA_BLOCKS} one index block can describe",
                root.nr_blocks
            )));
        } else {
            let mut buf = vec![0u8; BLOCK_SIZE];
            match walker
                .device()
                .read_block(loc, &mut buf)
                .and_then(|_| parse_metadata_index(loc, &buf, want as usize))
            {
                Ok(entries) => index = entries,
                Err(e) => errors.push(e),
            }
        }
        for e in &index {
            walker.inc_ref(e.blocknr);
        }
        let ref_count_leaves = load_ref_count_tree(walker, root.ref_count_root, &mut errors);
        (
            DiskSpaceMap {
                kind: SmKind::Metadata,
                root,
                index,
                ref_count_leaves,
            },
            errors,
        )
    }

    /// Whether the index says any of `blocks` is allocated: from the
    /// index entries' free counts alone (no bitmap is read), so only a
    /// hint, for deciding where memory for counts is worth preparing.
    pub fn any_allocated(&self, blocks: std::ops::Range<u64>) -> bool {
        let first = (blocks.start / ENTRIES_PER_BITMAP) as usize;
        let end = (blocks.end.div_ceil(ENTRIES_PER_BITMAP) as usize).min(self.index.len());
        self.index
            .get(first..end)
            .is_some_and(|es| es.iter().any(|e| u64::from(e.nr_free) < ENTRIES_PER_BITMAP))
    }

    /// Compare every block's on-disk count with `actual`, reading the bitmaps
    /// in sorted batches. Entries beyond `nr_blocks` in the last bitmap are
    /// ignored. A large map (a 16 GiB pool's data space map has 40,000
    /// bitmaps) is compared in pieces by two threads; the result is the
    /// same as one pass in block order.
    pub fn compare(&self, dev: &BlockDevice, actual: &RefCounts) -> SmDiff {
        self.compare_split(dev, actual, PARALLEL_COMPARE_BITMAPS, COMPARE_PIECE)
    }

    /// [`DiskSpaceMap::compare`]; from `parallel_from` bitmaps on, by two
    /// threads taking pieces of `piece` bitmaps in turn as they finish
    /// (counts of 3 or more, the slow part, bunch up where origins and
    /// their snapshots share data: fixed halves left one thread idle).
    fn compare_split(
        &self,
        dev: &BlockDevice,
        actual: &RefCounts,
        parallel_from: usize,
        piece: usize,
    ) -> SmDiff {
        let n = self.index.len();
        let parallel = n >= parallel_from.max(2);
        let piece = if parallel { piece.max(1) } else { n.max(1) };
        let next = std::sync::atomic::AtomicUsize::new(0);
        let work = || {
            let mut done = Vec::new();
            let mut scratch = ReadScratch::default();
            loop {
                let p = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let first = p.saturating_mul(piece);
                if first >= n {
                    return done;
                }
                let range = first..n.min(first + piece);
                done.push((p, self.compare_bitmaps(dev, actual, range, &mut scratch)));
            }
        };
        let mut pieces = if parallel {
            std::thread::scope(|s| {
                let other = std::thread::Builder::new().spawn_scoped(s, work);
                // Without a second thread (a process limit) this one takes
                // every piece.
                let mut mine = work();
                match other.map(|o| o.join()) {
                    Ok(Ok(theirs)) => mine.extend(theirs),
                    Ok(Err(p)) => std::panic::resume_unwind(p),
                    Err(_) => {}
                }
                mine
            })
        } else {
            work()
        };
        pieces.sort_unstable_by_key(|(p, _)| *p);
        let mut diff = SmDiff::default();
        let mut nr_allocated = 0;
        for (_, (d, allocated)) in pieces {
            diff.append(d);
            nr_allocated += allocated;
        }
        // Pieces compared apart may each meet the same damaged ref-count
        // leaf: it is reported once.
        let mut reported = std::collections::HashSet::new();
        diff.errors.retain(|e| reported.insert(e.to_string()));
        if diff.errors.is_empty() && nr_allocated != self.root.nr_allocated {
            diff.warnings.push(format!(
                "the root says {} blocks are allocated; its bitmaps count {nr_allocated}",
                self.root.nr_allocated
            ));
        }
        diff
    }

    /// Compare the blocks of bitmaps `range`; returns the differences and
    /// the number of blocks the bitmaps count as allocated.
    fn compare_bitmaps(
        &self,
        dev: &BlockDevice,
        actual: &RefCounts,
        range: std::ops::Range<usize>,
        scratch: &mut ReadScratch,
    ) -> (SmDiff, u64) {
        let mut diff = SmDiff::default();
        let first_bitmap = range.start;
        let locs: Vec<u64> = self.index[range].iter().map(|e| e.blocknr).collect();
        let nr_blocks = self.root.nr_blocks;
        let mut nr_allocated = 0u64;
        let mut rc = RefCountCursor::starting_at(
            dev,
            &self.ref_count_leaves,
            first_bitmap as u64 * ENTRIES_PER_BITMAP,
        );
        dev.read_in_order_with(scratch, &locs, 256, |i, loc, data| {
            let i = first_bitmap + i;
            let bitmap = match data.and_then(|d| Bitmap::parse(loc, d)) {
                Ok(b) => b,
                Err(e) => {
                    diff.errors.push(e);
                    return Ok::<(), std::convert::Infallible>(());
                }
            };
            let base = i as u64 * ENTRIES_PER_BITMAP;
            let n = (nr_blocks - base).min(ENTRIES_PER_BITMAP) as usize;
            let mut free = 0u32;
            const LO: u64 = 0x5555_5555_5555_5555;
            let mut j = 0;
            while j < n {
                // Fast path: 32 entries at once, when the bitmap word equals
                // the recomputed counts (2 bits each, 3 = "3 or more"); only
                // the "3 or more" entries are then compared one by one, with
                // the ref-count tree (shared blocks of snapshots).
                if j % 32 == 0 && j + 32 <= n {
                    let dw = bitmap.word(j / 32);
                    let mem = ((dw & LO) << 1) | ((dw >> 1) & LO);
                    let aw = actual.word(((base as usize) + j) / 32);
                    if mem == aw {
                        let used = ((mem | (mem >> 1)) & LO).count_ones();
                        nr_allocated += used as u64;
                        free += 32 - used;
                        let mut threes = mem & (mem >> 1) & LO;
                        // The exact counts, a word of nibbles at once
                        // (tens of millions of shared blocks in a pool
                        // with many snapshots).
                        let wide = if threes != 0 {
                            actual.wide_word((base as usize + j) / 32)
                        } else {
                            None
                        };
                        // The usual case: the next ref-count entries are
                        // those blocks, with those counts.
                        if let Some(x) = wide {
                            if rc.agrees_with_word(base + j as u64, threes, x) {
                                threes = 0;
                            }
                        }
                        while threes != 0 {
                            let f = threes.trailing_zeros() as u64 / 2;
                            threes &= threes - 1;
                            let b = base + j as u64 + f;
                            let want = match wide {
                                Some(x) => match (x[f as usize / 16] >> (4 * (f % 16))) & 15 {
                                    15 => actual.get(b),
                                    v => v as u32,
                                },
                                None => actual.get(b),
                            };
                            // Agreeing with the next ref-count entry: done.
                            if rc.get_near(b) != Some(want) || want < 3 {
                                diff.compare_block(b, 3, want, &mut rc);
                            }
                        }
                        j += 32;
                        continue;
                    }
                }
                let b = base + j as u64;
                j += 1;
                if diff.compare_block(b, bitmap.get(j - 1), actual.get(b), &mut rc) == 0 {
                    free += 1;
                } else {
                    nr_allocated += 1;
                }
            }
            // The kernel counts the unused tail of the last bitmap as free.
            let e = &self.index[i];
            let tail = (ENTRIES_PER_BITMAP as usize - n) as u32;
            if e.nr_free != free && e.nr_free != free + tail {
                diff.warnings.push(format!(
                    "index entry {i} says bitmap {loc} has {} free entries; it has {free}",
                    e.nr_free
                ));
            }
            Ok(())
        })
        .ok();
        (diff, nr_allocated)
    }
}

/// Bitmaps from which [`DiskSpaceMap::compare`] uses a second thread
/// (16 M blocks: below that a thread costs more than it saves).
const PARALLEL_COMPARE_BITMAPS: usize = 1024;

/// Bitmaps a comparing thread takes at a time (4 M blocks; each piece
/// starts its own ref-count cursor, a binary search of a few reads).
const COMPARE_PIECE: usize = 256;

impl SmDiff {
    /// Compare block `b`'s on-disk count (its 2-bit bitmap entry `small`,
    /// 3 = look in the ref-count tree) with `want`, the references found.
    /// Returns the on-disk count.
    #[inline]
    fn compare_block(&mut self, b: u64, small: u32, want: u32, rc: &mut RefCountCursor) -> u32 {
        let disk = if small == 3 {
            match rc.get(b) {
                Ok(c) => c.unwrap_or(0),
                Err(e) => {
                    self.errors.push(e);
                    0
                }
            }
        } else {
            small
        };
        if small == 3 && disk < 3 {
            self.errors.push(Error::Other(format!(
                "block {b} is marked as counted in the ref-count tree, which holds {}",
                if disk == 0 {
                    "no entry for it".to_string()
                } else {
                    format!("count {disk}")
                }
            )));
        }
        if disk != want {
            if want == 0 {
                self.nr_leaked += 1;
                if self.leaked.len() < MAX_LISTED {
                    self.leaked.push((b, disk));
                }
            } else {
                self.nr_mismatched += 1;
                if self.mismatched.len() < MAX_LISTED {
                    self.mismatched.push((b, disk, want));
                }
            }
        }
        disk
    }
}

impl DiskSpaceMap {
    /// Every block's count, read from the bitmaps and the ref-count tree.
    pub fn to_counts(&self, dev: &BlockDevice) -> Result<RefCounts> {
        let nr_blocks = self.root.nr_blocks;
        let mut counts = RefCounts::new(nr_blocks);
        let locs: Vec<u64> = self.index.iter().map(|e| e.blocknr).collect();
        let mut rc = RefCountCursor::new(dev, &self.ref_count_leaves);
        dev.read_in_order(&locs, 256, |i, loc, data| {
            let bitmap = Bitmap::parse(loc, data?)?;
            let base = i as u64 * ENTRIES_PER_BITMAP;
            let n = (nr_blocks.saturating_sub(base)).min(ENTRIES_PER_BITMAP) as usize;
            for j in 0..n {
                let b = base + j as u64;
                match bitmap.get(j) {
                    0 => {}
                    3 => match rc.get(b)? {
                        Some(c) if c >= 3 => counts.set(b, c),
                        _ => {
                            return Err(Error::invalid(
                                loc,
                                format!("block {b} is marked 3+ but the ref-count tree has no count of 3 or more for it"),
                            ))
                        }
                    },
                    v => counts.set(b, v),
                }
            }
            Ok::<(), Error>(())
        })?;
        Ok(counts)
    }

    /// The blocks this space map counts as in use (count > 0).
    pub fn in_use(&self, dev: &BlockDevice) -> Result<fixedbitset::FixedBitSet> {
        let counts = self.to_counts(dev)?;
        let mut set = fixedbitset::FixedBitSet::with_capacity(counts.nr_blocks() as usize);
        for b in 0..counts.nr_blocks() {
            if counts.get(b) > 0 {
                set.insert(b as usize);
            }
        }
        Ok(set)
    }
}

/// Validate the metadata space map's index block and return its first `want` entries.
pub fn parse_metadata_index(loc: u64, data: &[u8], want: usize) -> Result<Vec<IndexEntry>> {
    checksum::validate(loc, data, BlockKind::MetadataIndex)?;
    let mut out = Vec::with_capacity(want);
    for i in 0..want.min(MAX_METADATA_BITMAPS) {
        let e = IndexEntry::decode(&data[INDEX_HEADER + 16 * i..INDEX_HEADER + 16 * (i + 1)]);
        if e.blocknr == 0 {
            return Err(Error::invalid(
                loc,
                format!("index entry {i} is empty; {want} bitmaps are needed"),
            ));
        }
        out.push(e);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// entries_agree (four at a time where the CPU can, the rest one by
    /// one) against the plain statement: the entries, as a set of
    /// (block, count), are the word's "3 or more" blocks with their nibbles.
    #[test]
    fn entries_agree_as_a_set_comparison() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut agreed, mut refused) = (0, 0);
        for round in 0..20_000 {
            let base = 1_000_000 + 32 * (rnd() % 1000);
            let fields = rnd() & rnd() & 0x5555_5555_5555_5555;
            if fields == 0 {
                continue;
            }
            let nibbles = [rnd(), rnd()];
            let nibble = |f: u64| (nibbles[(f / 16) as usize] >> (4 * (f % 16))) & 15;
            let mut entries: Vec<(u64, u32)> = (0..32u64)
                .filter(|f| fields >> (2 * f) & 1 == 1)
                .map(|f| (base + f, nibble(f) as u32))
                .collect();
            // Spoil some: a count, a block, a block outside the word.
            match round % 4 {
                1 => {
                    let i = rnd() as usize % entries.len();
                    entries[i].1 ^= 1 << (rnd() % 5);
                }
                2 => {
                    let i = rnd() as usize % entries.len();
                    entries[i].0 = base + rnd() % 40;
                }
                3 => {
                    let i = rnd() as usize % entries.len();
                    entries[i].0 = base.wrapping_sub(1 + rnd() % 3);
                }
                _ => {}
            }
            let keys: Vec<u8> = entries.iter().flat_map(|e| e.0.to_le_bytes()).collect();
            let counts: Vec<u8> = entries.iter().flat_map(|e| e.1.to_le_bytes()).collect();
            let want: std::collections::BTreeSet<(u64, u32)> = (0..32u64)
                .filter(|f| fields >> (2 * f) & 1 == 1)
                .map(|f| (base + f, nibble(f) as u32))
                .collect();
            let got: std::collections::BTreeSet<(u64, u32)> = entries.iter().copied().collect();
            let expect =
                got == want && got.len() == entries.len() && want.iter().all(|e| e.1 != 15);
            assert_eq!(
                entries_agree(&keys, &counts, base, fields, nibbles),
                expect,
                "round {round}: entries {entries:?}, fields {fields:#x}"
            );
            if expect {
                agreed += 1;
            } else {
                refused += 1;
            }
        }
        assert!(agreed > 1000 && refused > 1000, "{agreed} / {refused}");
    }

    /// The comparison takes 32 entries a word at a time where the bitmap
    /// and the found counts agree; a count of "3 or more" in such a word is
    /// still compared exactly, through the ref-count tree.
    /// Compared in two halves on two threads, a map gives exactly the
    /// differences of one pass: leaks and wrong counts on both sides of the
    /// split, lists cut at their first entries, counts of 3 or more looked
    /// up in a ref-count tree of many leaves from the middle on.
    #[test]
    fn compare_in_halves_is_one_pass() {
        use crate::pdata::io::OpenMode;
        use crate::pdata::writer::BlockWriter;
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(256 * BLOCK_SIZE as u64).unwrap();
        let dev = BlockDevice::open(f.path(), OpenMode::ReadWriteExclusive).unwrap();
        let nr = 9 * ENTRIES_PER_BITMAP + 77;
        let mut on_disk = RefCounts::new(nr);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..40_000 {
            let b = next() % nr;
            on_disk.set(b, 1 + (next() % 6) as u32);
        }
        let mut w = BlockWriter::new(&dev, 256, None);
        let root = crate::pdata::space_map::write::write_data_sm(&mut w, &on_disk).unwrap();
        w.flush().unwrap();
        let mut walker = Walker::new(&dev);
        let (sm, errs) = DiskSpaceMap::load_data(&mut walker, root);
        assert!(errs.is_empty(), "{errs:?}");
        assert!(
            sm.ref_count_leaves.len() > 8,
            "{}",
            sm.ref_count_leaves.len()
        );

        let mut found = on_disk.clone();
        for _ in 0..60 {
            let b = next() % nr;
            let c = found.get(b);
            found.set(b, if c == 0 { 2 } else { (c + 1) % 7 });
        }
        for found in [&on_disk, &found] {
            let one = sm.compare_split(&dev, found, usize::MAX, 1);
            for piece in [1, 2, 5] {
                let pieces = sm.compare_split(&dev, found, 1, piece);
                assert_eq!(format!("{one:?}"), format!("{pieces:?}"));
            }
        }
        // And all are what a block-by-block comparison finds.
        let d = sm.compare_split(&dev, &found, 1, 2);
        let (mut leaked, mut mismatched) = (Vec::new(), Vec::new());
        for b in 0..nr {
            let (disk, want) = (on_disk.get(b), found.get(b));
            if disk != want && want == 0 {
                leaked.push((b, disk));
            } else if disk != want {
                mismatched.push((b, disk, want));
            }
        }
        let mid = (sm.index.len() / 2) as u64 * ENTRIES_PER_BITMAP;
        let differ = |b: u64| on_disk.get(b) != found.get(b);
        assert!((0..mid).any(differ) && (mid..nr).any(differ));
        assert_eq!(d.nr_leaked, leaked.len() as u64);
        assert_eq!(d.nr_mismatched, mismatched.len() as u64);
        assert!(d.nr_mismatched > MAX_LISTED as u64);
        leaked.truncate(MAX_LISTED);
        mismatched.truncate(MAX_LISTED);
        assert_eq!((d.leaked, d.mismatched), (leaked, mismatched));
        assert!(d.errors.is_empty() && d.warnings.is_empty());

        // A cursor started in the middle finds what one from the start finds.
        for start in [0, 1, mid - 1, mid, nr / 3, nr - 1] {
            let mut from_start = RefCountCursor::new(&dev, &sm.ref_count_leaves);
            let mut from_mid = RefCountCursor::starting_at(&dev, &sm.ref_count_leaves, start);
            for b in start..nr {
                let want = from_start.get(b).unwrap();
                assert_eq!(from_mid.get(b).unwrap(), want, "block {b} from {start}");
            }
        }
    }

    #[test]
    fn counts_of_three_or_more_are_compared_exactly() {
        use crate::pdata::io::OpenMode;
        use crate::pdata::writer::BlockWriter;
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(64 * BLOCK_SIZE as u64).unwrap();
        let dev = BlockDevice::open(f.path(), OpenMode::ReadWriteExclusive).unwrap();
        let nr = 3 * 32 + 5;
        let mut on_disk = RefCounts::new(nr);
        for (b, n) in [(0, 1), (1, 5), (2, 3), (3, 2), (40, 17), (41, 1), (99, 4)] {
            on_disk.set(b, n);
        }
        let mut w = BlockWriter::new(&dev, 64, None);
        let root = crate::pdata::space_map::write::write_data_sm(&mut w, &on_disk).unwrap();
        w.flush().unwrap();
        let mut walker = Walker::new(&dev);
        let (sm, errs) = DiskSpaceMap::load_data(&mut walker, root);
        assert!(errs.is_empty(), "{errs:?}");

        let same = sm.compare(&dev, &on_disk);
        assert_eq!((same.nr_leaked, same.nr_mismatched), (0, 0));
        assert!(
            same.errors.is_empty() && same.warnings.is_empty(),
            "{same:?}"
        );

        // Each 2-bit word still agrees (3 = "3 or more" on both sides).
        let mut found = on_disk.clone();
        found.set(1, 4);
        found.set(40, 16);
        found.set(99, 3);
        let d = sm.compare(&dev, &found);
        assert_eq!(d.nr_mismatched, 3, "{d:?}");
        assert_eq!(d.mismatched, vec![(1, 5, 4), (40, 17, 16), (99, 4, 3)]);
        assert_eq!(d.nr_leaked, 0);
    }

    #[test]
    fn bitmap_entries_decode_with_the_even_bit_high() {
        let mut blk = vec![0u8; BLOCK_SIZE];
        let mut w0 = 0u64;
        bitmap_word_set(&mut w0, 0, 1);
        bitmap_word_set(&mut w0, 1, 2);
        bitmap_word_set(&mut w0, 2, 3);
        bitmap_word_set(&mut w0, 31, 2);
        // Entry 0 = 1 is stored as bit1 set (the odd bit is the low bit).
        assert_eq!(w0 & 3, 0b10);
        blk[16..24].copy_from_slice(&w0.to_le_bytes());
        blk[8..16].copy_from_slice(&9u64.to_le_bytes());
        checksum::seal(&mut blk, BlockKind::Bitmap);
        let bm = Bitmap::parse(9, &blk).unwrap();
        assert_eq!(
            (bm.get(0), bm.get(1), bm.get(2), bm.get(3), bm.get(31)),
            (1, 2, 3, 0, 2)
        );
        assert!(Bitmap::parse(8, &blk).is_err());
        blk[100] ^= 4;
        assert!(Bitmap::parse(9, &blk).is_err());
    }

    #[test]
    fn metadata_limits() {
        assert_eq!(MAX_METADATA_BLOCKS, 4_161_600);
        assert_eq!(MAX_METADATA_BLOCKS * 4096, 17_045_913_600);
    }
}
