//! A btree node is a checked view of its 4 KiB block. Validation happens once
//! in [`Node::parse`]; afterwards every accessor is in bounds and cannot fail.
//!
//! Layout: 32-byte header (csum, flags, blocknr, nr_entries, max_entries,
//! value_size, padding), then `keys[max_entries]` (le64), then
//! `values[max_entries]` of `value_size` bytes each. Note the value area
//! starts after *max_entries* keys, not nr_entries.

use crate::pdata::checksum::{self, BlockKind};
use crate::pdata::error::{Error, Problem, Result};
use crate::pdata::{le32, le64, BLOCK_SIZE};

pub const NODE_HEADER_SIZE: usize = 32;
pub const INTERNAL_NODE: u32 = 1;
pub const LEAF_NODE: u32 = 2;

/// The largest number of entries a node with values of `value_size` bytes
/// holds, as the kernel computes it (a multiple of 3).
pub const fn max_entries(value_size: usize) -> usize {
    3 * (((BLOCK_SIZE - NODE_HEADER_SIZE) / (8 + value_size)) / 3)
}

/// A fixed-size value stored in btree leaves.
pub trait Value: Sized {
    const SIZE: usize;
    /// Decode from exactly `SIZE` bytes.
    fn decode(b: &[u8]) -> Self;
}

impl Value for u64 {
    const SIZE: usize = 8;
    #[inline(always)]
    fn decode(b: &[u8]) -> Self {
        le64(b, 0)
    }
}

impl Value for u32 {
    const SIZE: usize = 4;
    #[inline(always)]
    fn decode(b: &[u8]) -> Self {
        le32(b, 0)
    }
}

#[derive(Clone, Copy)]
pub struct Node<'a> {
    data: &'a [u8],
    leaf: bool,
    nr: usize,
    max: usize,
    value_size: usize,
}

impl<'a> Node<'a> {
    /// Validate `data` (the block at `loc`) as a node of a tree whose leaves
    /// hold `leaf_value_size`-byte values; internal nodes always hold 8-byte
    /// child pointers. Checks checksum, location, flags, sizes and strictly
    /// increasing keys: after this the node is safe to read.
    pub fn parse(loc: u64, data: &'a [u8], leaf_value_size: usize) -> Result<Node<'a>> {
        if data.len() != BLOCK_SIZE {
            return Err(Error::invalid(
                loc,
                format!("node is {} bytes, not {BLOCK_SIZE}", data.len()),
            ));
        }
        checksum::validate(loc, data, BlockKind::BTreeNode)?;
        let flags = le32(data, 4);
        let leaf = match flags {
            INTERNAL_NODE => false,
            LEAF_NODE => true,
            f => {
                return Err(bad_header(
                    loc,
                    format!("node flags {f:#x} are neither internal (1) nor leaf (2)"),
                ))
            }
        };
        let nr = le32(data, 16) as usize;
        let max = le32(data, 20) as usize;
        let value_size = le32(data, 24) as usize;
        let want_vs = if leaf { leaf_value_size } else { 8 };
        if value_size != want_vs {
            let kind = if leaf { "leaf" } else { "internal node" };
            return Err(bad_header(
                loc,
                format!("{kind} value size is {value_size}, expected {want_vs}"),
            ));
        }
        if max == 0
            || !matches!(max.checked_mul(8 + value_size), Some(b) if NODE_HEADER_SIZE + b <= BLOCK_SIZE)
        {
            return Err(bad_header(
                loc,
                format!("max_entries {max} does not fit a block with {value_size}-byte values"),
            ));
        }
        if nr > max {
            return Err(bad_header(
                loc,
                format!("nr_entries {nr} exceeds max_entries {max}"),
            ));
        }
        if !leaf && nr == 0 {
            return Err(bad_header(loc, "internal node has no entries".to_string()));
        }
        let node = Node {
            data,
            leaf,
            nr,
            max,
            value_size,
        };
        // Every key above the one before, the first offender looked for
        // only when there is one.
        if !keys_rise(&data[NODE_HEADER_SIZE..NODE_HEADER_SIZE + 8 * nr]) {
            for i in 1..nr {
                if node.key(i) <= node.key(i - 1) {
                    return Err(Error::invalid(
                        loc,
                        format!(
                            "keys out of order: key {} ({}) follows key {} ({})",
                            i,
                            node.key(i),
                            i - 1,
                            node.key(i - 1)
                        ),
                    ));
                }
            }
        }
        Ok(node)
    }

    /// The view of a block that [`Node::parse`] already accepted (so its
    /// checksum is not computed again, e.g. on another thread). Only the
    /// header is read; given data `parse` rejected, accessors may panic but
    /// never read out of bounds.
    pub fn validated(data: &'a [u8]) -> Node<'a> {
        Node {
            data,
            leaf: le32(data, 4) == LEAF_NODE,
            nr: le32(data, 16) as usize,
            max: le32(data, 20) as usize,
            value_size: le32(data, 24) as usize,
        }
    }

    pub fn block(&self) -> u64 {
        le64(self.data, 8)
    }
    pub fn is_leaf(&self) -> bool {
        self.leaf
    }
    pub fn nr_entries(&self) -> usize {
        self.nr
    }
    pub fn max_entries(&self) -> usize {
        self.max
    }
    pub fn value_size(&self) -> usize {
        self.value_size
    }

    #[inline(always)]
    pub fn key(&self, i: usize) -> u64 {
        le64(self.data, NODE_HEADER_SIZE + 8 * i)
    }

    pub fn first_key(&self) -> Option<u64> {
        (self.nr > 0).then(|| self.key(0))
    }
    pub fn last_key(&self) -> Option<u64> {
        (self.nr > 0).then(|| self.key(self.nr - 1))
    }

    pub fn keys(&self) -> impl ExactSizeIterator<Item = u64> + '_ {
        (0..self.nr).map(move |i| self.key(i))
    }

    #[inline(always)]
    pub fn value_bytes(&self, i: usize) -> &'a [u8] {
        let off = NODE_HEADER_SIZE + 8 * self.max + self.value_size * i;
        &self.data[off..off + self.value_size]
    }

    /// The keys of all entries, back to back (`8 * nr_entries` bytes,
    /// little-endian).
    #[inline(always)]
    pub fn key_area(&self) -> &'a [u8] {
        &self.data[NODE_HEADER_SIZE..NODE_HEADER_SIZE + 8 * self.nr]
    }

    /// The values of all entries, back to back (`nr_entries * value_size`
    /// bytes): for loops over a whole leaf without a bounds check per value.
    #[inline(always)]
    pub fn value_area(&self) -> &'a [u8] {
        let off = NODE_HEADER_SIZE + 8 * self.max;
        &self.data[off..off + self.value_size * self.nr]
    }

    /// Value `i` decoded as `V`. `V::SIZE` must equal the node's value size
    /// (true for leaves parsed with `V::SIZE`, and for u64 in internal nodes).
    #[inline(always)]
    pub fn value<V: Value>(&self, i: usize) -> V {
        debug_assert_eq!(V::SIZE, self.value_size);
        V::decode(self.value_bytes(i))
    }

    /// Child pointer `i` of an internal node.
    #[inline(always)]
    pub fn child(&self, i: usize) -> u64 {
        le64(self.value_bytes(i), 0)
    }

    /// `(key, value)` pairs.
    pub fn entries<V: Value>(&self) -> impl ExactSizeIterator<Item = (u64, V)> + '_ {
        (0..self.nr).map(move |i| (self.key(i), self.value::<V>(i)))
    }

    /// Problems the kernel tolerates but that show a badly built tree:
    /// a max_entries that is not a multiple of 3, or a non-root node filled
    /// below a third. Reported as non-fatal by thin_check.
    pub fn fill_problem(&self, is_root: bool) -> Option<String> {
        if self.max % 3 != 0 {
            return Some(format!("max_entries {} is not a multiple of 3", self.max));
        }
        if !is_root && self.nr < self.max / 3 {
            return Some(format!(
                "node holds {} entries, fewer than a third of {}",
                self.nr, self.max
            ));
        }
        None
    }
}

/// Whether each of the little-endian u64 `keys` is above the one before,
/// without a branch a key (a leaf holds up to 254 keys, and a 16 GiB pool
/// has millions of leaves): four at a time where the processor has AVX2.
#[inline]
fn keys_rise(keys: &[u8]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the processor has AVX2.
        return unsafe { keys_rise_avx2(keys) };
    }
    keys_rise_from(keys, 1)
}

/// [`keys_rise`] for keys `first..` (each against the one before).
#[inline(always)]
fn keys_rise_from(keys: &[u8], first: usize) -> bool {
    let n = keys.len() / 8;
    (first.max(1)..n).fold(true, |ok, i| {
        ok & (le64(keys, 8 * i) > le64(keys, 8 * (i - 1)))
    })
}

/// [`keys_rise`] four keys at a time: each against the one before (an
/// unaligned load one key back), unsigned, as a signed compare of the keys
/// with their top bits flipped.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn keys_rise_avx2(keys: &[u8]) -> bool {
    use std::arch::x86_64::*;
    let n = keys.len() / 8;
    let p = keys.as_ptr();
    let sign = _mm256_set1_epi64x(i64::MIN);
    let mut rises = _mm256_set1_epi64x(-1);
    let mut i = 1;
    while i + 4 <= n {
        // SAFETY: keys i - 1 .. i + 4 lie inside `keys` (i >= 1, i + 4 <= n).
        let (cur, before) = unsafe {
            (
                _mm256_loadu_si256(p.add(8 * i).cast()),
                _mm256_loadu_si256(p.add(8 * (i - 1)).cast()),
            )
        };
        let above = _mm256_cmpgt_epi64(_mm256_xor_si256(cur, sign), _mm256_xor_si256(before, sign));
        rises = _mm256_and_si256(rises, above);
        i += 4;
    }
    _mm256_movemask_pd(_mm256_castsi256_pd(rises)) == 0xf && keys_rise_from(keys, i)
}

fn bad_header(loc: u64, msg: String) -> Error {
    Error::corrupt(loc, Problem::BadHeader(msg))
}

/// Test helpers: build node blocks byte by byte as the kernel lays them out.
#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    pub fn build(
        loc: u64,
        leaf: bool,
        keys: &[u64],
        values: &[&[u8]],
        value_size: usize,
    ) -> Vec<u8> {
        let max = max_entries(value_size);
        let mut b = vec![0u8; BLOCK_SIZE];
        b[4..8].copy_from_slice(&(if leaf { LEAF_NODE } else { INTERNAL_NODE }).to_le_bytes());
        b[8..16].copy_from_slice(&loc.to_le_bytes());
        b[16..20].copy_from_slice(&(keys.len() as u32).to_le_bytes());
        b[20..24].copy_from_slice(&(max as u32).to_le_bytes());
        b[24..28].copy_from_slice(&(value_size as u32).to_le_bytes());
        for (i, k) in keys.iter().enumerate() {
            b[32 + 8 * i..40 + 8 * i].copy_from_slice(&k.to_le_bytes());
        }
        for (i, v) in values.iter().enumerate() {
            let off = 32 + 8 * max + value_size * i;
            b[off..off + value_size].copy_from_slice(v);
        }
        checksum::seal(&mut b, BlockKind::BTreeNode);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::build;
    use super::*;

    #[test]
    fn max_entries_match_the_kernel() {
        assert_eq!(max_entries(8), 252);
        assert_eq!(max_entries(16), 168);
        assert_eq!(max_entries(24), 126);
        assert_eq!(max_entries(4), 336);
    }

    #[test]
    fn keys_must_rise() {
        let vals: Vec<[u8; 8]> = (0..200u64).map(|v| v.to_le_bytes()).collect();
        let refs: Vec<&[u8]> = vals.iter().map(|v| &v[..]).collect();
        let rising: Vec<u64> = (0..200u64).map(|k| 3 * k + 1).collect();
        assert!(Node::parse(7, &build(7, true, &rising, &refs, 8), 8).is_ok());
        // A fall, or a repeat, anywhere: the first one is named.
        for (at, key) in [(1, 1), (150, 2), (199, 3 * 198 + 1), (120, 0)] {
            let mut keys = rising.clone();
            keys[at] = key;
            let b = build(7, true, &keys, &refs, 8);
            let Err(e) = Node::parse(7, &b, 8) else {
                panic!("keys {keys:?} accepted");
            };
            let first_bad = (1..200).find(|&i| keys[i] <= keys[i - 1]).unwrap();
            let want = format!(
                "key {} ({}) follows key {} ({})",
                first_bad,
                keys[first_bad],
                first_bad - 1,
                keys[first_bad - 1]
            );
            assert!(e.to_string().contains(&want), "{e} lacks {want}");
        }
    }

    /// The vector check against a plain one, on every count of keys up to
    /// 21 with one key spoiled at each place, keys on both sides of 2^63
    /// (an unsigned order that a signed compare would get wrong).
    #[test]
    fn keys_rise_agrees_with_a_plain_check() {
        let plain = |k: &[u64]| k.windows(2).all(|w| w[1] > w[0]);
        let bytes = |k: &[u64]| k.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
        for base in [0u64, (1 << 63) - 10] {
            for n in 0..=21usize {
                let rising: Vec<u64> = (0..n as u64).map(|i| base + 2 * i + 1).collect();
                assert!(keys_rise(&bytes(&rising)), "n {n} base {base}");
                for at in 0..n {
                    for v in [0, rising[at] - 1, rising[at] + 2, u64::MAX] {
                        let mut k = rising.clone();
                        k[at] = v;
                        assert_eq!(keys_rise(&bytes(&k)), plain(&k), "{k:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn leaf_view_reads_keys_and_values() {
        let vals: Vec<[u8; 8]> = [10u64, 20, 30].iter().map(|v| v.to_le_bytes()).collect();
        let refs: Vec<&[u8]> = vals.iter().map(|v| &v[..]).collect();
        let b = build(7, true, &[1, 5, 9], &refs, 8);
        let n = Node::parse(7, &b, 8).unwrap();
        assert!(n.is_leaf());
        assert_eq!(n.keys().collect::<Vec<_>>(), vec![1, 5, 9]);
        assert_eq!(
            n.entries::<u64>().collect::<Vec<_>>(),
            vec![(1, 10), (5, 20), (9, 30)]
        );
        assert_eq!(n.fill_problem(true), None);
        assert!(n.fill_problem(false).is_some());
    }

    #[test]
    fn every_single_byte_corruption_of_the_header_is_caught_or_harmless() {
        let vals: Vec<[u8; 8]> = (0..100u64).map(|v| v.to_le_bytes()).collect();
        let refs: Vec<&[u8]> = vals.iter().map(|v| &v[..]).collect();
        let keys: Vec<u64> = (0..100).collect();
        let good = build(3, true, &keys, &refs, 8);
        for off in 0..BLOCK_SIZE {
            for bit in [0x01u8, 0x80] {
                let mut b = good.clone();
                b[off] ^= bit;
                // Without resealing the checksum must catch it.
                assert!(Node::parse(3, &b, 8).is_err(), "offset {off}");
                // Resealed (a writer bug, not bit rot): must not panic.
                checksum::seal(&mut b, BlockKind::BTreeNode);
                if let Ok(n) = Node::parse(3, &b, 8) {
                    let _ = n.entries::<u64>().count();
                }
            }
        }
    }

    #[test]
    fn bad_headers_are_typed_errors() {
        let b = build(3, true, &[], &[], 8);
        assert!(matches!(
            Node::parse(4, &b, 8),
            Err(Error::Corrupt {
                block: 4,
                problem: Problem::WrongLocation { found: 3 }
            })
        ));
        assert!(matches!(
            Node::parse(3, &b, 24),
            Err(Error::Corrupt {
                problem: Problem::BadHeader(_),
                ..
            })
        ));
        let mut b2 = build(3, true, &[5, 4], &[&[0; 8], &[0; 8]], 8);
        checksum::seal(&mut b2, BlockKind::BTreeNode);
        assert!(Node::parse(3, &b2, 8).is_err());
        let mut b3 = b.clone();
        b3[16..20].copy_from_slice(&300u32.to_le_bytes());
        checksum::seal(&mut b3, BlockKind::BTreeNode);
        assert!(Node::parse(3, &b3, 8).is_err());
    }
}
