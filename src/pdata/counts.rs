//! Reference counts rebuilt in memory, in the on-disk encoding: 2 bits a
//! block (0, 1, 2, 3 = "3 or more") plus an overflow map for counts >= 3, so
//! memory stays near nr_blocks / 4 bytes.

use std::collections::HashMap;

#[derive(Debug, Clone)]
pub struct RefCounts {
    bits: Vec<u64>,
    overflow: HashMap<u64, u32>,
    nr_blocks: u64,
}

impl RefCounts {
    pub fn new(nr_blocks: u64) -> RefCounts {
        RefCounts {
            bits: vec![0; nr_blocks.div_ceil(32) as usize],
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

    /// Count of block `b` (0 beyond the end).
    #[inline]
    pub fn get(&self, b: u64) -> u32 {
        if b >= self.nr_blocks {
            return 0;
        }
        match self.small(b) {
            3 => self.overflow[&b],
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
        let s = self.small(b);
        let w = &mut self.bits[(b / 32) as usize];
        match s {
            0..=1 => {
                *w += 1 << ((b % 32) * 2);
                s as u32
            }
            2 => {
                *w |= 3 << ((b % 32) * 2);
                self.overflow.insert(b, 3);
                2
            }
            _ => {
                let c = self.overflow.get_mut(&b).unwrap();
                let old = *c;
                *c = c.saturating_add(1);
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
        let s = self.small(b);
        let w = &mut self.bits[(b / 32) as usize];
        match s {
            0 => 0,
            1..=2 => {
                *w -= 1 << ((b % 32) * 2);
                s as u32
            }
            _ => {
                let old = self.overflow[&b];
                if old <= 3 {
                    self.overflow.remove(&b);
                    *w &= !(3 << ((b % 32) * 2));
                    *w |= 2 << ((b % 32) * 2);
                } else {
                    self.overflow.insert(b, old - 1);
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
        let w = &mut self.bits[(b / 32) as usize];
        *w &= !(3 << ((b % 32) * 2));
        self.overflow.remove(&b);
        if count >= 3 {
            *w |= 3 << ((b % 32) * 2);
            self.overflow.insert(b, count);
        } else {
            *w |= (count as u64) << ((b % 32) * 2);
        }
    }

    /// Blocks with counts of 3 or more, in block order, with their counts.
    pub fn overflow_sorted(&self) -> Vec<(u64, u32)> {
        let mut v: Vec<(u64, u32)> = self.overflow.iter().map(|(&b, &c)| (b, c)).collect();
        v.sort_unstable();
        v
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
