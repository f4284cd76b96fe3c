//! Reference counts rebuilt in memory, in chunks of 65536 blocks that each
//! take only the width their counts need:
//!
//! * a chunk nothing was counted in takes no memory;
//! * a "narrow" chunk keeps 2 bits a block (counts 0, 1, 2: the on-disk
//!   bitmap encoding), 16 KiB;
//! * the first count of 3 or more turns the chunk "wide": 4 bits a block
//!   (counts 0..=14), 32 KiB, and a count of 15 or more lives in a sparse
//!   overflow map.
//!
//! So a pool with little sharing costs about nr_blocks / 4 bytes, and a
//! heavily shared one (most blocks referenced by an origin and its
//! snapshots) nr_blocks / 2 bytes rather than a byte or more a block.
//! Chunks live in fixed slots of 2 MiB slabs (see [`Slab`]); where the
//! kernel backs a slab with a huge page, a slab with any count in it costs
//! its whole 2 MiB.

use std::collections::HashMap;

use super::mem::HugeZeroed;

/// Blocks per chunk.
const CHUNK_SHIFT: u32 = 16;
const CHUNK: u64 = 1 << CHUNK_SHIFT;
const CHUNK_MASK: u64 = CHUNK - 1;
/// 64-bit words of a narrow (2-bit) chunk.
const NARROW_WORDS: usize = (CHUNK / 32) as usize;
/// 64-bit words of a wide (4-bit) chunk, and of a chunk's slot in a slab.
const WIDE_WORDS: usize = (CHUNK / 16) as usize;
/// Chunks per slab: 64 slots of 32 KiB, one 2 MiB huge page.
pub const SLAB_CHUNKS: usize = 64;
/// Blocks per slab (4 Mi): counts filled by two threads are split on
/// multiples of this (see [`RefCounts::absorb`]).
pub const SLAB_SHIFT: u32 = CHUNK_SHIFT + 6;
/// A nibble of this value means: look in the overflow map.
const BIG: u64 = 15;
/// The low bit of every 2-bit field / nibble.
const LO2: u64 = 0x5555_5555_5555_5555;
const LO4: u64 = 0x1111_1111_1111_1111;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Width {
    /// Every count is 0 (the chunk's slot may not exist).
    Zero,
    /// Counts 0..=2, two bits each (bit 2i = low bit of block i of the
    /// word), in the first half of the chunk's slot.
    Narrow,
    /// Counts 0..=14, four bits each; 15 = see the overflow map.
    Wide,
}

/// The memory of up to [`SLAB_CHUNKS`] chunks, a slot of [`WIDE_WORDS`]
/// each, zeroed. Counting references to fragmented data touches counts at
/// random over hundreds of MiB: a full slab is one huge page (see
/// [`HugeZeroed`]).
#[derive(Debug, Clone)]
struct Slab {
    mem: HugeZeroed,
}

impl Slab {
    /// A slab, its memory faulted in now ([`HugeZeroed::new_faulted_in`]):
    /// a slab is made for a count about to be written, and counting reads
    /// a count before it writes it; a fresh page first read is mapped to
    /// the kernel's zero page and replaced at the write, a second fault
    /// that also flushes the TLB of every core the process runs on (see
    /// `pdata::mem`).
    fn new(slots: usize) -> Slab {
        Slab {
            mem: HugeZeroed::new_faulted_in(slots * WIDE_WORDS),
        }
    }

    #[inline(always)]
    fn slot(&self, i: usize) -> &[u64] {
        &self.mem.words()[i * WIDE_WORDS..(i + 1) * WIDE_WORDS]
    }

    #[inline(always)]
    fn slot_mut(&mut self, i: usize) -> &mut [u64] {
        &mut self.mem.words_mut()[i * WIDE_WORDS..(i + 1) * WIDE_WORDS]
    }
}

#[derive(Debug, Clone)]
pub struct RefCounts {
    widths: Vec<Width>,
    /// Slab `i` holds chunks `i * SLAB_CHUNKS ..`; allocated at the first
    /// count in any of them.
    slabs: Vec<Option<Slab>>,
    /// Counts of 15 or more.
    overflow: HashMap<u64, u32>,
    nr_blocks: u64,
}

/// The 16 nibbles of `x`, each saturated at 3, packed as 2-bit fields
/// into the low 32 bits.
#[inline(always)]
fn nibbles_to_2bit(x: u64) -> u64 {
    // Per nibble: 3 when bit 2 or 3 is set, else its low two bits.
    let high = ((x >> 2) | (x >> 3)) & LO4;
    let mut v = (x & 0x3333_3333_3333_3333) | (high * 3);
    v = (v | (v >> 2)) & 0x0f0f_0f0f_0f0f_0f0f;
    v = (v | (v >> 4)) & 0x00ff_00ff_00ff_00ff;
    v = (v | (v >> 8)) & 0x0000_ffff_0000_ffff;
    (v | (v >> 16)) & 0xffff_ffff
}

/// Spread 16 2-bit fields (low 32 bits of `x`) out to nibbles.
#[inline(always)]
fn two_bit_to_nibbles(x: u64) -> u64 {
    let mut v = x & 0xffff_ffff;
    v = (v | (v << 16)) & 0x0000_ffff_0000_ffff;
    v = (v | (v << 8)) & 0x00ff_00ff_00ff_00ff;
    v = (v | (v << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    (v | (v << 2)) & 0x3333_3333_3333_3333
}

/// The low bit of each of the `n` `width`-bit fields starting at field `first`.
#[inline(always)]
fn field_mask(first: u64, n: u64, width: u64) -> u64 {
    let lo = if width == 2 { LO2 } else { LO4 };
    let bits = n * width;
    let span = if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    (lo & span) << (first * width)
}

impl RefCounts {
    pub fn new(nr_blocks: u64) -> RefCounts {
        let nr_chunks = nr_blocks.div_ceil(CHUNK) as usize;
        RefCounts {
            widths: vec![Width::Zero; nr_chunks],
            slabs: (0..nr_chunks.div_ceil(SLAB_CHUNKS)).map(|_| None).collect(),
            overflow: HashMap::new(),
            nr_blocks,
        }
    }

    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    /// The slot of chunk `c` (zeroes when its slab does not exist).
    #[inline(always)]
    fn slot(&self, c: usize) -> &[u64] {
        static ZEROES: [u64; WIDE_WORDS] = [0; WIDE_WORDS];
        match &self.slabs[c / SLAB_CHUNKS] {
            Some(s) => s.slot(c % SLAB_CHUNKS),
            None => &ZEROES,
        }
    }

    /// Chunk slots of slab `s` of counts with `nr_chunks` chunks (the last
    /// slab may be short).
    #[inline(always)]
    fn slab_slots(nr_chunks: usize, s: usize) -> usize {
        SLAB_CHUNKS.min(nr_chunks - s * SLAB_CHUNKS)
    }

    /// The slot of chunk `c`, its slab allocated when missing.
    #[inline(always)]
    fn slot_mut(&mut self, c: usize) -> &mut [u64] {
        let nr_chunks = self.widths.len();
        let s = c / SLAB_CHUNKS;
        self.slabs[s]
            .get_or_insert_with(|| Slab::new(Self::slab_slots(nr_chunks, s)))
            .slot_mut(c % SLAB_CHUNKS)
    }

    /// Chunk `c`, made at least narrow, with its words.
    #[inline(always)]
    fn touch(&mut self, c: usize) -> (Width, &mut [u64]) {
        if self.widths[c] == Width::Zero {
            self.widths[c] = Width::Narrow;
        }
        let w = self.widths[c];
        (w, self.slot_mut(c))
    }

    /// The blocks of each slab (4 Mi blocks), in order.
    pub fn slab_ranges(&self) -> impl Iterator<Item = std::ops::Range<u64>> {
        let n = self.nr_blocks;
        (0..self.slabs.len() as u64).map(move |s| s << SLAB_SHIFT..((s + 1) << SLAB_SHIFT).min(n))
    }

    /// Allocate now the slab holding block `b`, its memory faulted in
    /// ([`HugeZeroed::new_faulted_in`]): for a thread with time to spare,
    /// ahead of counting that will touch it. No count changes.
    pub fn prefault_slab(&mut self, b: u64) {
        let s = (b >> SLAB_SHIFT) as usize;
        if s < self.slabs.len() && self.slabs[s].is_none() {
            self.slabs[s] = Some(Slab::new(Self::slab_slots(self.widths.len(), s)));
        }
    }

    /// Make chunk `c` wide (4 bits a block), keeping its counts: in place,
    /// from the last word down, so no narrow word is overwritten unread.
    #[cold]
    fn widen(&mut self, c: usize) {
        let was = self.widths[c];
        self.widths[c] = Width::Wide;
        let slot = self.slot_mut(c);
        if was == Width::Narrow {
            for i in (0..NARROW_WORDS).rev() {
                let w = slot[i];
                slot[2 * i + 1] = two_bit_to_nibbles(w >> 32);
                slot[2 * i] = two_bit_to_nibbles(w);
            }
        }
    }

    /// Count of block `b` (0 beyond the end).
    #[inline]
    pub fn get(&self, b: u64) -> u32 {
        if b >= self.nr_blocks {
            return 0;
        }
        let c = (b >> CHUNK_SHIFT) as usize;
        let off = (b & CHUNK_MASK) as usize;
        match self.widths[c] {
            Width::Zero => 0,
            Width::Narrow => ((self.slot(c)[off / 32] >> ((off % 32) * 2)) & 3) as u32,
            Width::Wide => {
                let v = (self.slot(c)[off / 16] >> ((off % 16) * 4)) & 15;
                if v == BIG {
                    self.overflow.get(&b).copied().unwrap_or(BIG as u32)
                } else {
                    v as u32
                }
            }
        }
    }

    /// Hint that `b`'s count will be needed soon (it is likely not cached:
    /// counting references to fragmented data is bound by memory latency).
    #[inline(always)]
    pub fn prefetch(&self, b: u64) {
        #[cfg(target_arch = "x86_64")]
        if b < self.nr_blocks {
            let c = (b >> CHUNK_SHIFT) as usize;
            let off = (b & CHUNK_MASK) as usize;
            let word = match self.widths[c] {
                Width::Zero => return,
                Width::Narrow => off / 32,
                Width::Wide => off / 16,
            };
            let p: *const u64 = &self.slot(c)[word];
            // SAFETY: prefetching is a hint; any address is allowed.
            unsafe {
                std::arch::x86_64::_mm_prefetch(p.cast::<i8>(), std::arch::x86_64::_MM_HINT_T0)
            };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = b;
    }

    /// Add one to `b`'s count. Returns the old count. Blocks beyond the end
    /// are ignored (callers report them as errors first).
    #[inline]
    pub fn inc(&mut self, b: u64) -> u32 {
        if b >= self.nr_blocks {
            return 0;
        }
        let c = (b >> CHUNK_SHIFT) as usize;
        let off = (b & CHUNK_MASK) as usize;
        loop {
            match self.touch(c) {
                (Width::Narrow, w) => {
                    let word = &mut w[off / 32];
                    let sh = (off % 32) * 2;
                    let s = (*word >> sh) & 3;
                    if s < 2 {
                        *word += 1 << sh;
                        return s as u32;
                    }
                    self.widen(c);
                }
                (_, w) => {
                    let word = &mut w[off / 16];
                    let sh = (off % 16) * 4;
                    let v = (*word >> sh) & 15;
                    if v < BIG - 1 {
                        *word += 1 << sh;
                        return v as u32;
                    }
                    if v == BIG - 1 {
                        *word |= BIG << sh;
                        self.overflow.insert(b, BIG as u32);
                        return v as u32;
                    }
                    let e = self.overflow.entry(b).or_insert(BIG as u32);
                    let old = *e;
                    *e = old.saturating_add(1);
                    return old;
                }
            }
        }
    }

    /// Add one to the count of each block of `start..start + len` (blocks
    /// beyond the end are ignored). The same as [`RefCounts::inc`] on each,
    /// a word (32 or 16 blocks) at a time: mappings come in runs of
    /// consecutive data blocks, and counting them one by one was most of
    /// thin_check's time on a large pool.
    #[inline]
    pub fn inc_run(&mut self, start: u64, len: u64) {
        let end = start.saturating_add(len).min(self.nr_blocks);
        let mut b = start;
        while b < end {
            let c = (b >> CHUNK_SHIFT) as usize;
            let chunk_end = ((c as u64 + 1) << CHUNK_SHIFT).min(end);
            b = self.inc_in_chunk(c, b, chunk_end);
        }
    }

    /// [`RefCounts::inc_run`] of blocks `b..end` of chunk `c`, a word at a
    /// time, as far as it can go: returns where it stopped (`end`, or a
    /// block whose count must first be made wider).
    #[inline(always)]
    fn inc_in_chunk(&mut self, c: usize, mut b: u64, end: u64) -> u64 {
        match self.touch(c) {
            (Width::Narrow, w) => {
                while b < end {
                    let off = b & CHUNK_MASK;
                    let first = off % 32;
                    let n = (32 - first).min(end - b);
                    let m = field_mask(first, n, 2);
                    let word = &mut w[(off / 32) as usize];
                    if (*word >> 1) & m != 0 {
                        // A count of 2 would become 3: go wide, redo.
                        self.widen(c);
                        return b;
                    }
                    *word += m;
                    b += n;
                }
                b
            }
            (_, w) => {
                while b < end {
                    let off = b & CHUNK_MASK;
                    let first = off % 16;
                    let n = (16 - first).min(end - b);
                    let m = field_mask(first, n, 4);
                    let word = &mut w[(off / 16) as usize];
                    // Nibbles of 14 or 15 need the overflow map.
                    if (*word >> 1) & (*word >> 2) & (*word >> 3) & m != 0 {
                        for x in b..b + n {
                            self.inc(x);
                        }
                        return b + n;
                    }
                    *word += m;
                    b += n;
                }
                b
            }
        }
    }

    /// Add `other`'s counts to these. Made for counts filled by two
    /// threads from disjoint ranges of blocks: a slab (4 Mi blocks, see
    /// [`SLAB_SHIFT`]) only one side counted in is moved over as it is;
    /// a slab both counted in is added block by block.
    pub fn absorb(&mut self, mut other: RefCounts) {
        assert_eq!(self.nr_blocks, other.nr_blocks, "counts of different sizes");
        let mut both = Vec::new();
        for s in 0..self.slabs.len() {
            match (&self.slabs[s], other.slabs[s].take()) {
                (_, None) => {}
                (None, theirs) => {
                    self.slabs[s] = theirs;
                    let chunks = s * SLAB_CHUNKS..((s + 1) * SLAB_CHUNKS).min(self.widths.len());
                    self.widths[chunks.clone()].copy_from_slice(&other.widths[chunks.clone()]);
                    other.widths[chunks].fill(Width::Zero);
                }
                (Some(_), theirs) => {
                    other.slabs[s] = theirs;
                    both.push(s);
                }
            }
        }
        // Counts of 15 or more in the slabs moved over come along; those
        // in slabs both sides counted in are added with the rest below.
        for (&b, &n) in &other.overflow {
            if other.slabs[(b >> SLAB_SHIFT) as usize].is_none() {
                self.overflow.insert(b, n);
            }
        }
        for s in both {
            let chunks = s * SLAB_CHUNKS..((s + 1) * SLAB_CHUNKS).min(self.widths.len());
            // Chunks the other side counted nothing in are skipped (the
            // space maps' own blocks, counted apart from the trees', are
            // few and bunched).
            for c in chunks.filter(|&c| other.widths[c] != Width::Zero) {
                let first = c as u64 * CHUNK;
                for b in first..(first + CHUNK).min(self.nr_blocks) {
                    let n = other.get(b);
                    if n > 0 {
                        self.set(b, self.get(b).saturating_add(n));
                    }
                }
            }
        }
    }

    /// Take one from `b`'s count. Returns the old count; a count already 0
    /// stays 0 (callers decide whether that is an error).
    pub fn dec(&mut self, b: u64) -> u32 {
        let old = self.get(b);
        if old > 0 {
            self.set(b, old - 1);
        }
        old
    }

    /// Set `b`'s count.
    pub fn set(&mut self, b: u64, count: u32) {
        if b >= self.nr_blocks {
            return;
        }
        let c = (b >> CHUNK_SHIFT) as usize;
        let off = (b & CHUNK_MASK) as usize;
        if count == 0 && self.widths[c] == Width::Zero {
            return;
        }
        loop {
            match self.touch(c) {
                (Width::Narrow, w) if count < 3 => {
                    let word = &mut w[off / 32];
                    let sh = (off % 32) * 2;
                    *word = (*word & !(3 << sh)) | ((count as u64) << sh);
                    return;
                }
                (Width::Narrow, _) => self.widen(c),
                (_, w) => {
                    let word = &mut w[off / 16];
                    let sh = (off % 16) * 4;
                    let v = (count as u64).min(BIG);
                    *word = (*word & !(15 << sh)) | (v << sh);
                    if v == BIG {
                        self.overflow.insert(b, count);
                    } else {
                        self.overflow.remove(&b);
                    }
                    return;
                }
            }
        }
    }

    /// Blocks with counts of 3 or more, in block order, with their counts.
    pub fn overflow_iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.widths
            .iter()
            .enumerate()
            .filter(|(_, w)| **w == Width::Wide)
            .map(|(ci, _)| (ci as u64 * CHUNK, self.slot(ci)))
            .flat_map(move |(first, w)| {
                w.iter().enumerate().flat_map(move |(wi, &x)| {
                    // Nibbles of 3 or more: bit 2 or 3 set, or both low bits.
                    let mut big = ((x >> 2) | (x >> 3) | (x & (x >> 1))) & LO4;
                    std::iter::from_fn(move || {
                        if big == 0 {
                            return None;
                        }
                        let i = big.trailing_zeros() as u64 / 4;
                        big &= big - 1;
                        let b = first + wi as u64 * 16 + i;
                        let v = (x >> (i * 4)) & 15;
                        let count = if v == BIG {
                            self.overflow.get(&b).copied().unwrap_or(BIG as u32)
                        } else {
                            v as u32
                        };
                        Some((b, count))
                    })
                })
            })
            .filter(move |&(b, _)| b < self.nr_blocks)
    }

    /// How many blocks have counts of 3 or more (the length of
    /// [`RefCounts::overflow_iter`], a popcount a word).
    pub fn nr_overflow(&self) -> u64 {
        self.widths
            .iter()
            .enumerate()
            .filter(|(_, w)| **w == Width::Wide)
            .map(|(ci, _)| {
                let first = ci as u64 * CHUNK;
                self.slot(ci)
                    .iter()
                    .enumerate()
                    .map(|(wi, &x)| {
                        let mut big = ((x >> 2) | (x >> 3) | (x & (x >> 1))) & LO4;
                        let b0 = first + wi as u64 * 16;
                        let keep = self.nr_blocks.saturating_sub(b0);
                        if keep < 16 {
                            big &= (1u64 << (4 * keep)) - 1;
                        }
                        big.count_ones() as u64
                    })
                    .sum::<u64>()
            })
            .sum()
    }

    /// [`RefCounts::overflow_iter`], collected.
    pub fn overflow_sorted(&self) -> Vec<(u64, u32)> {
        self.overflow_iter().collect()
    }

    /// 2-bit counts (3 = "3 or more") of blocks `32 * w .. 32 * w + 32`, packed
    /// into a 64-bit word (bit 2i = low bit of block i); 0 beyond the end.
    #[inline]
    pub fn word(&self, w: usize) -> u64 {
        let c = w / NARROW_WORDS;
        let i = w % NARROW_WORDS;
        match self.widths.get(c) {
            None | Some(Width::Zero) => 0,
            Some(Width::Narrow) => self.slot(c)[i],
            Some(Width::Wide) => {
                let x = self.slot(c);
                nibbles_to_2bit(x[2 * i]) | (nibbles_to_2bit(x[2 * i + 1]) << 32)
            }
        }
    }

    /// The exact counts of blocks `32 * w .. 32 * w + 32` as nibbles (blocks
    /// `32 * w ..` in the first word, `32 * w + 16 ..` in the second; 15 =
    /// look in [`RefCounts::get`]), when their chunk keeps 4 bits a block
    /// (any count of 3 or more does); None otherwise.
    #[inline]
    pub fn wide_word(&self, w: usize) -> Option<[u64; 2]> {
        let c = w / NARROW_WORDS;
        let i = w % NARROW_WORDS;
        match self.widths.get(c) {
            Some(Width::Wide) => {
                let x = self.slot(c);
                Some([x[2 * i], x[2 * i + 1]])
            }
            _ => None,
        }
    }

    /// Number of blocks with a non-zero count.
    pub fn nr_allocated(&self) -> u64 {
        self.widths
            .iter()
            .enumerate()
            .map(|(c, w)| match w {
                Width::Zero => 0,
                // A field is non-zero when any of its bits is set.
                Width::Narrow => self.slot(c)[..NARROW_WORDS]
                    .iter()
                    .map(|w| ((w | (w >> 1)) & LO2).count_ones() as u64)
                    .sum(),
                Width::Wide => self
                    .slot(c)
                    .iter()
                    .map(|w| ((w | (w >> 1) | (w >> 2) | (w >> 3)) & LO4).count_ones() as u64)
                    .sum(),
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_grow_past_the_two_bit_range() {
        let mut c = RefCounts::new(100);
        for _ in 0..5 {
            c.inc(33);
        }
        c.inc(34);
        c.inc(99);
        c.inc(100); // beyond: ignored
        assert_eq!(c.get(33), 5);
        assert_eq!(c.get(34), 1);
        assert_eq!(c.get(32), 0);
        assert_eq!(c.get(99), 1);
        assert_eq!(c.get(100), 0);
        assert_eq!(c.nr_allocated(), 3);
        for want in (0..5).rev() {
            c.dec(33);
            assert_eq!(c.get(33), want);
        }
        c.set(34, 7);
        assert_eq!(c.get(34), 7);
        assert_eq!(c.overflow_sorted(), vec![(34, 7)]);
        assert_eq!(c.nr_overflow(), 1);
        c.set(34, 2);
        assert_eq!(c.get(34), 2);
        assert!(c.overflow_sorted().is_empty());
    }

    /// `inc_run` is `inc` on every block of the run: runs across words,
    /// chunks and the end, into counts that widen and overflow.
    #[test]
    fn runs_count_as_single_increments() {
        let n = 3 * CHUNK + 77;
        let mut runs = RefCounts::new(n);
        let mut single = RefCounts::new(n);
        let mut x = 987654321u64;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let start = if step % 2 == 0 { x % 200 } else { x % (n + 50) };
            let len = match step % 5 {
                0 => 1,
                1 => (x >> 32) % 40,
                2 => (x >> 32) % 300,
                3 if step % 1000 == 3 => CHUNK - 3,
                _ => (x >> 32) % 17,
            };
            runs.inc_run(start, len);
            for b in start..start + len {
                single.inc(b);
            }
        }
        for b in 0..n {
            assert_eq!(runs.get(b), single.get(b), "block {b}");
        }
        assert!((0..200).any(|b| runs.get(b) > 15));
        assert_eq!(runs.overflow_sorted(), single.overflow_sorted());
        assert_eq!(runs.nr_allocated(), single.nr_allocated());
        assert_eq!(runs.nr_overflow(), single.overflow_iter().count() as u64);
        assert!(runs.nr_overflow() > 200);
    }

    /// Counts filled from two sides add up: chunks only one side counted
    /// in (moved, with their overflow), chunks both counted in (added),
    /// counts past 15 on either side.
    #[test]
    fn absorbed_counts_add_up() {
        let n = 5 * CHUNK + 99;
        let (mut a, mut b, mut both) = (RefCounts::new(n), RefCounts::new(n), RefCounts::new(n));
        let mut x = 777u64;
        for step in 0..300_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let blk = match step % 4 {
                0 => x % 100,                      // chunk 0: both sides, past 15
                1 => CHUNK + x % 50,               // chunk 1: side a only, past 15
                2 => 3 * CHUNK + x % 70,           // chunk 3: side b only, past 15
                _ => 4 * CHUNK + x % (CHUNK + 99), // chunks 4, 5: both, sparse
            };
            let side_b = match step % 4 {
                1 => false,
                2 => true,
                _ => x & (1 << 40) != 0,
            };
            if side_b {
                b.inc(blk);
            } else {
                a.inc(blk);
            }
            both.inc(blk);
        }
        a.absorb(b);
        for blk in 0..n {
            assert_eq!(a.get(blk), both.get(blk), "block {blk}");
        }
        assert!(both.get(CHUNK + 1) > 15 && both.get(3 * CHUNK + 1) > 15 && both.get(1) > 15);
        assert_eq!(a.overflow_sorted(), both.overflow_sorted());
        assert_eq!(a.nr_allocated(), both.nr_allocated());
    }

    /// Counts in a full 2 MiB slab (the aligned, huge-page path) and a
    /// short last slab: widened in place, copied by clone, and slabs moved
    /// whole by absorb when only one side counted in them.
    #[test]
    fn full_slabs_keep_counts() {
        for prefaulted in [false, true] {
            full_slabs_keep_counts_with(prefaulted);
        }
    }

    /// With `prefaulted`, both sides first allocate every slab (empty),
    /// so absorb adds slab by slab where it would have moved slabs.
    fn full_slabs_keep_counts_with(prefaulted: bool) {
        let n = (SLAB_CHUNKS as u64 + 5) * CHUNK + 7;
        let mut want: HashMap<u64, u32> = HashMap::new();
        let (mut lower, mut upper) = (RefCounts::new(n), RefCounts::new(n));
        if prefaulted {
            for r in lower.slab_ranges().collect::<Vec<_>>() {
                lower.prefault_slab(r.start);
                upper.prefault_slab(r.start);
            }
            upper.prefault_slab(n);
            assert_eq!(lower.nr_allocated(), 0);
        }
        let mut x = 4242u64;
        for step in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = match step % 3 {
                0 => x % 500 + 70 * CHUNK / 2,
                1 => n - 1 - x % 300,
                _ => x % n,
            };
            let len = if step % 2 == 0 { 1 } else { (x >> 40) % 40 };
            // Blocks of slab 0 go to `lower`, the rest to `upper`.
            let c = if b >> SLAB_SHIFT == 0 {
                &mut lower
            } else {
                &mut upper
            };
            c.inc_run(b, len);
            for blk in b..(b + len).min(n) {
                *want.entry(blk).or_default() += 1;
            }
        }
        let copy = upper.clone();
        lower.absorb(upper);
        assert!(want.values().any(|&v| v > 15));
        for (&b, &v) in &want {
            assert_eq!(lower.get(b), v, "block {b}");
            if b >> SLAB_SHIFT > 0 {
                assert_eq!(copy.get(b), v, "copy, block {b}");
            }
        }
        assert_eq!(lower.nr_allocated(), want.len() as u64);
        let mut over: Vec<(u64, u32)> = want.into_iter().filter(|&(_, v)| v >= 3).collect();
        over.sort_unstable();
        assert_eq!(lower.overflow_sorted(), over);
    }

    /// Against a plain array: every width (zero, narrow, wide, overflow),
    /// chunk boundaries, words and the overflow listing.
    #[test]
    fn matches_a_plain_array() {
        let n = 3 * CHUNK + 77;
        let mut c = RefCounts::new(n);
        let mut want = vec![0u32; n as usize];
        let mut x = 12345u64;
        for step in 0..400_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Concentrate on a few blocks so counts pass 3 and 15.
            let b = if step % 3 == 0 { x % 300 } else { x % n };
            if (2 * CHUNK..3 * CHUNK).contains(&b) {
                continue; // a chunk left at zero
            }
            match x % 11 {
                0 => {
                    assert_eq!(c.dec(b), want[b as usize]);
                    want[b as usize] = want[b as usize].saturating_sub(1);
                }
                1 => {
                    let v = (x >> 20) as u32 % 40;
                    c.set(b, v);
                    want[b as usize] = v;
                }
                _ => {
                    assert_eq!(c.inc(b), want[b as usize]);
                    want[b as usize] += 1;
                }
            }
        }
        for b in 0..n {
            assert_eq!(c.get(b), want[b as usize], "block {b}");
        }
        assert!(want.iter().any(|&v| v > 15));
        assert!(want.iter().any(|&v| v == 1 || v == 2));
        let over: Vec<(u64, u32)> = (0..n)
            .filter(|&b| want[b as usize] >= 3)
            .map(|b| (b, want[b as usize]))
            .collect();
        assert_eq!(c.overflow_sorted(), over);
        assert_eq!(
            c.nr_allocated(),
            want.iter().filter(|&&v| v > 0).count() as u64
        );
        for w in 0..(n as usize).div_ceil(32) + 2 {
            let mut expect = 0u64;
            for i in 0..32 {
                let b = w * 32 + i;
                let v = want.get(b).copied().unwrap_or(0).min(3) as u64;
                expect |= v << (2 * i);
            }
            assert_eq!(c.word(w), expect, "word {w}");
        }
    }
}
