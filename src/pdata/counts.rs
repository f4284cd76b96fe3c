//! Reference counts rebuilt in memory, in the on-disk encoding: 2 bits a
//! block (0, 1, 2, 3 = "3 or more"), so memory stays near nr_blocks / 4
//! bytes. Counts of 3 or more live in a byte per block, allocated per chunk
//! of blocks only where such counts occur (heavily shared pools have
//! millions of them: a hash map would cost more than the bitmap), and counts
//! of 255 or more in a map.

use std::collections::HashMap;

/// Blocks per lazily allocated chunk of byte counts.
const CHUNK: u64 = 1 << 16;
/// A byte count of this value means: look in the overflow map.
const BIG: u8 = u8::MAX;

#[derive(Debug, Clone)]
pub struct RefCounts {
    bits: Vec<u64>,
    /// Per chunk: the counts of its blocks whose 2-bit value is 3.
    ext: Vec<Option<Box<[u8]>>>,
    overflow: HashMap<u64, u32>,
    nr_blocks: u64,
}

impl RefCounts {
    pub fn new(nr_blocks: u64) -> RefCounts {
        RefCounts {
            bits: vec![0; nr_blocks.div_ceil(32) as usize],
            ext: vec![None; nr_blocks.div_ceil(CHUNK) as usize],
            overflow: HashMap::new(),
            nr_blocks,
        }
    }

    pub fn nr_blocks(&self) -> u64 {
        self.nr_blocks
    }

    #[inline(always)]
    fn small(&self, b: u64) -> u64 {
        (self.bits[(b / 32) as usize] >> ((b % 32) * 2)) & 3
    }

    #[inline(always)]
    fn set_small(&mut self, b: u64, v: u64) {
        let w = &mut self.bits[(b / 32) as usize];
        *w = (*w & !(3 << ((b % 32) * 2))) | (v << ((b % 32) * 2));
    }

    /// The count of a block whose 2-bit value is 3.
    fn big(&self, b: u64) -> u32 {
        let byte = self.ext[(b / CHUNK) as usize]
            .as_ref()
            .map(|c| c[(b % CHUNK) as usize])
            .unwrap_or(3);
        if byte == BIG {
            self.overflow.get(&b).copied().unwrap_or(BIG as u32)
        } else {
            byte as u32
        }
    }

    /// Store a count of 3 or more.
    fn set_big(&mut self, b: u64, count: u32) {
        let chunk = self.ext[(b / CHUNK) as usize]
            .get_or_insert_with(|| vec![0u8; CHUNK as usize].into_boxed_slice());
        if count >= BIG as u32 {
            chunk[(b % CHUNK) as usize] = BIG;
            self.overflow.insert(b, count);
        } else {
            chunk[(b % CHUNK) as usize] = count as u8;
            self.overflow.remove(&b);
        }
    }

    /// Hint that `b`'s count will be needed soon (it is likely not cached:
    /// counting references to fragmented data is bound by memory latency).
    #[inline(always)]
    pub fn prefetch(&self, b: u64) {
        #[cfg(target_arch = "x86_64")]
        if let Some(w) = self.bits.get((b / 32) as usize) {
            let hint = |p: *const i8| {
                // SAFETY: prefetching is a hint; any address is allowed.
                unsafe { std::arch::x86_64::_mm_prefetch(p, std::arch::x86_64::_MM_HINT_T0) }
            };
            hint((w as *const u64).cast::<i8>());
            if let Some(Some(chunk)) = self.ext.get((b / CHUNK) as usize) {
                hint(chunk[(b % CHUNK) as usize..].as_ptr().cast::<i8>());
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = b;
    }

    /// Count of block `b` (0 beyond the end).
    #[inline]
    pub fn get(&self, b: u64) -> u32 {
        if b >= self.nr_blocks {
            return 0;
        }
        match self.small(b) {
            3 => self.big(b),
            s => s as u32,
        }
    }

    /// Add one to `b`'s count. Returns the old count. Blocks beyond the end
    /// are ignored (callers report them as errors first).
    #[inline]
    pub fn inc(&mut self, b: u64) -> u32 {
        if b >= self.nr_blocks {
            return 0;
        }
        match self.small(b) {
            s @ 0..=1 => {
                self.bits[(b / 32) as usize] += 1 << ((b % 32) * 2);
                s as u32
            }
            2 => {
                self.set_small(b, 3);
                self.set_big(b, 3);
                2
            }
            _ => {
                let old = self.big(b);
                self.set_big(b, old.saturating_add(1));
                old
            }
        }
    }

    /// Take one from `b`'s count. Returns the old count; a count already 0
    /// stays 0 (callers decide whether that is an error).
    pub fn dec(&mut self, b: u64) -> u32 {
        if b >= self.nr_blocks {
            return 0;
        }
        match self.small(b) {
            0 => 0,
            s @ 1..=2 => {
                self.bits[(b / 32) as usize] -= 1 << ((b % 32) * 2);
                s as u32
            }
            _ => {
                let old = self.big(b);
                if old <= 3 {
                    self.set_big(b, 0);
                    self.set_small(b, 2);
                } else {
                    self.set_big(b, old - 1);
                }
                old
            }
        }
    }

    /// Set `b`'s count.
    pub fn set(&mut self, b: u64, count: u32) {
        if b >= self.nr_blocks {
            return;
        }
        if self.small(b) == 3 {
            self.set_big(b, 0);
        }
        if count >= 3 {
            self.set_small(b, 3);
            self.set_big(b, count);
        } else {
            self.set_small(b, count as u64);
        }
    }

    /// Blocks with counts of 3 or more, in block order, with their counts.
    pub fn overflow_iter(&self) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.ext
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_some())
            .flat_map(move |(ci, _)| {
                let first = ci as u64 * CHUNK;
                let last = (first + CHUNK).min(self.nr_blocks);
                ((first / 32)..last.div_ceil(32)).flat_map(move |w| {
                    let word = self.bits[w as usize];
                    // Blocks whose two bits are both set.
                    let mut threes = word & (word >> 1) & 0x5555_5555_5555_5555;
                    std::iter::from_fn(move || {
                        if threes == 0 {
                            return None;
                        }
                        let b = w * 32 + threes.trailing_zeros() as u64 / 2;
                        threes &= threes - 1;
                        Some((b, self.big(b)))
                    })
                })
            })
    }

    /// [`RefCounts::overflow_iter`], collected.
    pub fn overflow_sorted(&self) -> Vec<(u64, u32)> {
        self.overflow_iter().collect()
    }

    /// Raw 2-bit count (3 = "3 or more") of blocks `32 * w .. 32 * w + 32`, packed
    /// as the 64-bit word `w` of the in-memory array (bit 2i = low bit of block i).
    #[inline]
    pub fn word(&self, w: usize) -> u64 {
        self.bits.get(w).copied().unwrap_or(0)
    }

    /// Number of blocks with a non-zero count.
    pub fn nr_allocated(&self) -> u64 {
        self.bits
            .iter()
            .map(|w| {
                // A 2-bit field is non-zero when either bit is set.
                let any = (w | (w >> 1)) & 0x5555_5555_5555_5555;
                any.count_ones() as u64
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
        c.set(34, 2);
        assert_eq!(c.get(34), 2);
        assert!(c.overflow_sorted().is_empty());
    }
}
