//! thin_shrink: make a pool fit in fewer data blocks.
//!
//! Every data block in use at or above the new size is given a free block
//! below it ([`plan`]); the mappings are rewritten through that plan
//! ([`Remap`], a visitor between a dump's events and a writer), and the
//! moved blocks' data is copied within the data device ([`copy_data`]).
//!
//! The plan is a function of the data block: every reference to a block (from
//! any device, snapshot or shared leaf) is rewritten to the same new block,
//! so sharing survives. The copies only go to blocks that no mapping of the
//! old metadata references, so the old metadata stays valid (its mappings
//! still point at the old, untouched blocks) until the new metadata replaces
//! it: the callers copy and flush the data first, and write the new
//! metadata after.

use std::fs::File;
use std::io;

use crate::thin::dump::{DeviceInfo, Mapping, MetadataVisitor, SuperblockInfo};
use crate::thin::merge::{Gather, MergeError};

/// `len` data blocks moved from `from..` to `to..`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Move {
    pub from: u64,
    pub to: u64,
    pub len: u64,
}

/// Where each data block in use at or above the new size goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub old_nr_blocks: u64,
    pub new_nr_blocks: u64,
    /// Data blocks in use (referenced by at least one mapping).
    pub used_blocks: u64,
    /// Sorted by `from`, disjoint.
    pub moves: Vec<Move>,
}

impl Plan {
    /// Data blocks that move.
    pub fn moved_blocks(&self) -> u64 {
        self.moves.iter().map(|m| m.len).sum()
    }

    /// One past the highest block read by the copy (0 if nothing moves).
    pub fn source_end(&self) -> u64 {
        self.moves.last().map_or(0, |m| m.from + m.len)
    }

    /// The new place of data block `b` and how many blocks from `b` on
    /// (at most `len`) move together with it.
    fn lookup(&self, b: u64, len: u64) -> Option<(u64, u64)> {
        if b < self.new_nr_blocks {
            return Some((b, len.min(self.new_nr_blocks - b)));
        }
        let i = self.moves.partition_point(|m| m.from + m.len <= b);
        let m = self.moves.get(i)?;
        if m.from > b {
            return None;
        }
        let off = b - m.from;
        Some((m.to + off, len.min(m.len - off)))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShrinkError {
    #[error(
        "Insufficient free space: {used} data blocks are in use, {above} of them at or above block {new}, but only {free} blocks below {new} are free (the pool cannot be smaller than {min} blocks)"
    )]
    Insufficient {
        used: u64,
        above: u64,
        free: u64,
        new: u64,
        /// The smallest size every block in use fits in.
        min: u64,
    },
    #[error(
        "--nr-blocks {new} is more than the pool's {old} data blocks: thin_shrink only shrinks (the kernel grows a pool when its data device is extended)"
    )]
    Grow { old: u64, new: u64 },
    /// The data device cannot be used as it is (too small).
    #[error("{0}")]
    DataUnusable(String),
    /// Reading or writing the data device failed.
    #[error("{0}")]
    Data(String),
}

/// Data blocks in use, gathered as runs `[begin, end)` in any order
/// (overlapping where blocks are shared). Memory grows with the mappings read
/// (consecutive mappings share a run), never with a block count the input
/// merely claims: a pool that says it has 10^14 data blocks costs nothing
/// until mappings use them. [`UsedRuns::normalize`] turns it into the
/// sorted [`NormalizedRuns`] that [`plan`] takes.
#[derive(Debug, Clone, Default)]
pub struct UsedRuns {
    runs: Vec<(u64, u64)>,
    /// `runs[..sorted]` is sorted, disjoint and not adjacent.
    sorted: usize,
}

impl UsedRuns {
    /// Mark `begin..end` in use.
    pub fn insert(&mut self, begin: u64, end: u64) {
        if begin >= end {
            return;
        }
        if let Some(last) = self.runs.last_mut() {
            if last.1 == begin {
                last.1 = end;
                return;
            }
        }
        self.runs.push((begin, end));
        if self.runs.len() >= 2 * self.sorted.max(4096) {
            self.compact();
        }
    }

    /// Sort and join the runs (runs inserted out of order, overlapping
    /// ones from shared blocks) in place.
    fn compact(&mut self) {
        if self.sorted == self.runs.len() {
            return;
        }
        self.runs.sort_unstable();
        let mut out = 0;
        for i in 0..self.runs.len() {
            let r = self.runs[i];
            if out > 0 && self.runs[out - 1].1 >= r.0 {
                self.runs[out - 1].1 = self.runs[out - 1].1.max(r.1);
            } else {
                self.runs[out] = r;
                out += 1;
            }
        }
        self.runs.truncate(out);
        self.sorted = out;
    }

    /// The runs sorted, disjoint and joined: the only way to get a
    /// [`NormalizedRuns`].
    pub fn normalize(mut self) -> NormalizedRuns {
        self.compact();
        NormalizedRuns { runs: self.runs }
    }
}

/// Data blocks in use as sorted, disjoint, non-adjacent runs `[begin, end)`;
/// made only by [`UsedRuns::normalize`], so a plan never sees unsorted runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NormalizedRuns {
    runs: Vec<(u64, u64)>,
}

impl NormalizedRuns {
    /// The runs, sorted and disjoint.
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// Data blocks in use.
    pub fn count(&self) -> u64 {
        self.runs.iter().map(|r| r.1 - r.0).sum()
    }
}

/// Plan moving the blocks of `used` (data blocks of a pool of
/// `old_nr_blocks`) at or above `new_nr_blocks` down to the lowest free
/// blocks below it, in order (runs stay runs where the free space allows).
/// Work and memory grow with the number of runs, not with the pool's size.
pub fn plan(
    used: &NormalizedRuns,
    old_nr_blocks: u64,
    new_nr_blocks: u64,
) -> Result<Plan, ShrinkError> {
    let old = old_nr_blocks;
    if new_nr_blocks > old {
        return Err(ShrinkError::Grow {
            old,
            new: new_nr_blocks,
        });
    }
    let n = new_nr_blocks;
    let runs = used.runs();
    let used_blocks = used.count();
    let below: u64 = runs
        .iter()
        .filter(|r| r.0 < n)
        .map(|r| r.1.min(n) - r.0)
        .sum();
    let above = used_blocks - below;
    let free = new_nr_blocks - below;
    if above > free {
        return Err(ShrinkError::Insufficient {
            used: used_blocks,
            above,
            free,
            new: new_nr_blocks,
            min: used_blocks,
        });
    }
    // The free runs below n, lowest first.
    let mut gaps = {
        let mut cursor = 0u64;
        let mut i = 0usize;
        std::iter::from_fn(move || loop {
            let (b, e) = match runs.get(i) {
                Some(&(b, e)) if b < n => (b, e),
                _ => {
                    let g = (cursor < n).then_some((cursor, n));
                    cursor = n;
                    return g;
                }
            };
            i += 1;
            let g = (cursor < b).then_some((cursor, b));
            cursor = e.min(n);
            if g.is_some() {
                return g;
            }
        })
    };
    let mut moves: Vec<Move> = Vec::new();
    let mut gap: Option<(u64, u64)> = None;
    for &(b, e) in runs.iter().filter(|r| r.1 > n) {
        let mut from = b.max(n);
        while from < e {
            let (gb, ge) = match gap.take().or_else(|| gaps.next()) {
                Some(g) => g,
                // There are at least as many free blocks below n as blocks above.
                None => break,
            };
            let len = (e - from).min(ge - gb);
            match moves.last_mut() {
                Some(m) if m.from + m.len == from && m.to + m.len == gb => m.len += len,
                _ => moves.push(Move { from, to: gb, len }),
            }
            from += len;
            if gb + len < ge {
                gap = Some((gb + len, ge));
            }
        }
    }
    Ok(Plan {
        old_nr_blocks: old,
        new_nr_blocks,
        used_blocks,
        moves,
    })
}

fn other(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// A visitor collecting the superblock and the data blocks the mappings use.
#[derive(Default)]
pub struct UsedBlocks {
    pub superblock: Option<SuperblockInfo>,
    pub used: UsedRuns,
}

impl MetadataVisitor for UsedBlocks {
    fn superblock_begin(&mut self, sb: &SuperblockInfo) -> io::Result<()> {
        self.used = UsedRuns::default();
        self.superblock = Some(sb.clone());
        Ok(())
    }
    fn mapping(&mut self, m: &Mapping) -> io::Result<()> {
        let nr = self.superblock.as_ref().map_or(0, |sb| sb.nr_data_blocks);
        if m.data_begin >= nr || m.len > nr - m.data_begin {
            return Err(other(format!(
                "data block {} beyond nr_data_blocks {nr}",
                m.data_begin.saturating_add(m.len).saturating_sub(1)
            )));
        }
        self.used.insert(m.data_begin, m.data_begin + m.len);
        Ok(())
    }
    fn reference(&mut self, _name: &str) -> io::Result<()> {
        // The shared run's data blocks were marked when its def was read.
        Ok(())
    }
    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Passes a dump's events on to `out` with the mappings rewritten by a
/// [`Plan`] and the pool's size set to the new one. Mappings that become
/// consecutive are joined.
pub struct Remap<'a> {
    plan: &'a Plan,
    out: &'a mut dyn MetadataVisitor,
    pending: Option<Mapping>,
}

impl<'a> Remap<'a> {
    pub fn new(plan: &'a Plan, out: &'a mut dyn MetadataVisitor) -> Self {
        Remap {
            plan,
            out,
            pending: None,
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.pending.take() {
            Some(m) => self.out.mapping(&m),
            None => Ok(()),
        }
    }

    fn push(&mut self, m: Mapping) -> io::Result<()> {
        if let Some(p) = &mut self.pending {
            if p.time == m.time
                && p.origin_begin + p.len == m.origin_begin
                && p.data_begin + p.len == m.data_begin
            {
                p.len += m.len;
                return Ok(());
            }
        }
        self.flush()?;
        self.pending = Some(m);
        Ok(())
    }
}

impl MetadataVisitor for Remap<'_> {
    fn superblock_begin(&mut self, sb: &SuperblockInfo) -> io::Result<()> {
        if sb.nr_data_blocks != self.plan.old_nr_blocks {
            return Err(other(format!(
                "the pool has {} data blocks, the plan was made for {}",
                sb.nr_data_blocks, self.plan.old_nr_blocks
            )));
        }
        let sb = SuperblockInfo {
            nr_data_blocks: self.plan.new_nr_blocks,
            ..sb.clone()
        };
        self.out.superblock_begin(&sb)
    }
    fn superblock_end(&mut self) -> io::Result<()> {
        self.flush()?;
        self.out.superblock_end()
    }
    fn def_begin(&mut self, name: &str) -> io::Result<()> {
        self.flush()?;
        self.out.def_begin(name)
    }
    fn def_end(&mut self) -> io::Result<()> {
        self.flush()?;
        self.out.def_end()
    }
    fn device_begin(&mut self, d: &DeviceInfo) -> io::Result<()> {
        self.flush()?;
        self.out.device_begin(d)
    }
    fn device_end(&mut self) -> io::Result<()> {
        self.flush()?;
        self.out.device_end()
    }
    fn mapping(&mut self, m: &Mapping) -> io::Result<()> {
        let mut done = 0;
        while done < m.len {
            let b = m.data_begin + done;
            let (to, n) = self.plan.lookup(b, m.len - done).ok_or_else(|| {
                // Only if the input changed since the plan was made.
                other(format!(
                    "data block {b} was not in use when the move was planned"
                ))
            })?;
            self.push(Mapping {
                origin_begin: m.origin_begin + done,
                data_begin: to,
                len: n,
                time: m.time,
            })?;
            done += n;
        }
        Ok(())
    }
    fn reference(&mut self, name: &str) -> io::Result<()> {
        self.flush()?;
        self.out.reference(name)
    }
    fn finish(&mut self) -> io::Result<()> {
        self.flush()?;
        self.out.finish()
    }
    fn upcoming(&mut self, m: &Mapping) {
        if let Some((to, _)) = self.plan.lookup(m.data_begin, 1) {
            self.out.upcoming(&Mapping {
                data_begin: to,
                ..*m
            });
        }
    }
}

/// Copy the data of every move of `plan` within the data device `data`
/// (named `name` in messages; blocks of `block_bytes`), then flush it to
/// stable storage. `progress` is told the blocks copied so far.
pub fn copy_data(
    data: &File,
    name: &str,
    block_bytes: u64,
    plan: &Plan,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), ShrinkError> {
    let size = data
        .metadata()
        .map_err(|e| ShrinkError::Data(format!("{name}: {e}")))?
        .len();
    check_data_size(name, size, block_bytes, plan)?;
    let err = |e: MergeError| ShrinkError::Data(e.to_string());
    let mut sink = |off: u64, bytes: &[u8]| -> Result<(), MergeError> {
        crate::pdata::io::write_at(data, bytes, off).map_err(|e| {
            MergeError::io(
                format!("{name}: writing {} bytes at offset {off}", bytes.len()),
                e,
            )
        })
    };
    let total = plan.moved_blocks();
    let mut done = 0;
    let mut gather = Gather::new(1 << 20);
    progress(0, total);
    for m in &plan.moves {
        // A move never overlaps itself: `to` is below the new size, `from` not.
        gather
            .add(
                data,
                name,
                m.from * block_bytes,
                m.to * block_bytes,
                m.len * block_bytes,
                &mut sink,
            )
            .map_err(err)?;
        done += m.len;
        progress(done, total);
    }
    gather.flush(&mut sink).map_err(err)?;
    crate::pdata::io::sync_all(data)
        .map_err(|e| ShrinkError::Data(format!("{name}: flushing: {e}")))?;
    Ok(())
}

/// The data device must hold every block the copy reads.
pub fn check_data_size(
    name: &str,
    size: u64,
    block_bytes: u64,
    plan: &Plan,
) -> Result<(), ShrinkError> {
    let need = plan.source_end().saturating_mul(block_bytes);
    if size < need {
        return Err(ShrinkError::DataUnusable(format!(
            "{name}: the data device has {size} bytes but the blocks to move end at byte {need} (data block {} of {block_bytes} bytes)",
            plan.source_end() - 1
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(blocks: &[u64]) -> NormalizedRuns {
        let mut s = UsedRuns::default();
        for &b in blocks {
            s.insert(b, b + 1);
        }
        s.normalize()
    }

    #[test]
    fn plan_fills_the_lowest_free_blocks_in_order() {
        let u = used(&[0, 1, 2, 90, 91, 92, 95]);
        let p = plan(&u, 100, 10).unwrap();
        assert_eq!(
            p.moves,
            vec![
                Move {
                    from: 90,
                    to: 3,
                    len: 3
                },
                Move {
                    from: 95,
                    to: 6,
                    len: 1
                }
            ]
        );
        assert_eq!(p.moved_blocks(), 4);
        assert_eq!(p.source_end(), 96);
        assert_eq!(p.lookup(1, 5), Some((1, 5)));
        assert_eq!(p.lookup(91, 5), Some((4, 2)));
        assert_eq!(p.lookup(93, 1), None);
    }

    #[test]
    fn plan_refuses_what_does_not_fit_and_growing() {
        let u = used(&[0, 1, 2, 3, 50]);
        assert!(plan(&u, 100, 5).is_ok());
        match plan(&u, 100, 4) {
            Err(ShrinkError::Insufficient {
                used: 5,
                above: 1,
                free: 0,
                new: 4,
                min: 5,
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(plan(&u, 100, 101), Err(ShrinkError::Grow { .. })));
        assert!(plan(&u, 100, 100).unwrap().moves.is_empty());
        assert!(plan(&used(&[]), 10, 0).unwrap().moves.is_empty());
    }

    /// The planner on a bitset, one block at a time: the reference.
    fn plan_by_blocks(used: &[bool], new: usize) -> Option<Vec<(u64, u64)>> {
        let free: Vec<usize> = (0..new).filter(|&b| !used[b]).collect();
        let above: Vec<usize> = (new..used.len()).filter(|&b| used[b]).collect();
        (above.len() <= free.len()).then(|| {
            above
                .iter()
                .zip(&free)
                .map(|(&f, &t)| (f as u64, t as u64))
                .collect()
        })
    }

    #[test]
    fn plan_on_runs_matches_the_plan_block_by_block() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % n
        };
        for _ in 0..300 {
            let nr = 1 + rnd(80) as usize;
            let mut bits = vec![false; nr];
            let mut u = UsedRuns::default();
            for _ in 0..rnd(12) {
                let b = rnd(nr as u64);
                let e = (b + 1 + rnd(6)).min(nr as u64);
                u.insert(b, e);
                bits[b as usize..e as usize]
                    .iter_mut()
                    .for_each(|x| *x = true);
            }
            let u = u.normalize();
            let new = rnd(nr as u64 + 1) as usize;
            let by_runs = plan(&u, nr as u64, new as u64);
            match plan_by_blocks(&bits, new) {
                None => assert!(matches!(by_runs, Err(ShrinkError::Insufficient { .. }))),
                Some(pairs) => {
                    let p = by_runs.unwrap();
                    let got: Vec<(u64, u64)> = p
                        .moves
                        .iter()
                        .flat_map(|m| (0..m.len).map(move |i| (m.from + i, m.to + i)))
                        .collect();
                    assert_eq!(got, pairs, "{bits:?} to {new}");
                    assert_eq!(p.used_blocks, bits.iter().filter(|&&x| x).count() as u64);
                }
            }
        }
    }

    #[test]
    fn a_huge_pool_costs_only_its_runs() {
        let mut u = UsedRuns::default();
        u.insert(0, 5);
        u.insert(90_000_000_000_000, 90_000_000_000_003);
        u.insert(3, 7); // overlapping, out of order
        let u = u.normalize();
        assert_eq!(
            u.runs(),
            &[(0, 7), (90_000_000_000_000, 90_000_000_000_003)]
        );
        let p = plan(&u, 100_000_000_000_000, 10).unwrap();
        assert_eq!(
            p.moves,
            vec![Move {
                from: 90_000_000_000_000,
                to: 7,
                len: 3
            }]
        );
        // One run of 10^13 blocks moves as one run, without a step per block.
        let mut u = UsedRuns::default();
        u.insert(60_000_000_000_000, 70_000_000_000_000);
        let u = u.normalize();
        let p = plan(&u, 100_000_000_000_000, 50_000_000_000_000).unwrap();
        assert_eq!(p.moved_blocks(), 10_000_000_000_000);
        assert_eq!(p.moves.len(), 1);
    }

    #[test]
    fn unsorted_and_overlapping_runs_plan_as_sorted_ones() {
        // The same blocks, inserted sorted and disjoint, and inserted out of
        // order with overlaps and duplicates (as shared leaves give them).
        let sorted = [(0, 3), (5, 6), (40, 44), (60, 70), (95, 99)];
        let mut a = UsedRuns::default();
        for &(b, e) in &sorted {
            a.insert(b, e);
        }
        let mut b = UsedRuns::default();
        for &(s, e) in &[
            (95, 97),
            (60, 65),
            (41, 44),
            (0, 2),
            (96, 99),
            (5, 6),
            (63, 70),
            (40, 42),
            (1, 3),
            (60, 61),
            (95, 99),
        ] {
            b.insert(s, e);
        }
        let (a, b) = (a.normalize(), b.normalize());
        assert_eq!(a.runs(), &sorted);
        assert_eq!(b, a);
        assert_eq!(b.count(), 3 + 1 + 4 + 10 + 4);
        for new in [30, 50, 70, 100] {
            assert_eq!(plan(&b, 100, new).unwrap(), plan(&a, 100, new).unwrap());
        }
        let p = plan(&b, 100, 30).unwrap();
        assert_eq!(p.used_blocks, 22);
        assert_eq!(p.moved_blocks(), 18);
        assert_eq!(
            p.moves.first(),
            Some(&Move {
                from: 40,
                to: 3,
                len: 2
            })
        );
        assert!(matches!(
            plan(&b, 100, 20),
            Err(ShrinkError::Insufficient { used: 22, .. })
        ));

        // Past the in-place compaction threshold, runs still come out sorted.
        let mut c = UsedRuns::default();
        for i in (0..10_000u64).rev() {
            c.insert(2 * i, 2 * i + 1);
            c.insert(2 * i, 2 * i + 1);
        }
        let c = c.normalize();
        assert_eq!(c.runs().len(), 10_000);
        assert!(c.runs().windows(2).all(|w| w[0].1 < w[1].0));
        assert_eq!(c.count(), 10_000);
    }

    /// Collects mappings per device.
    #[derive(Default)]
    struct Maps(Vec<Mapping>, Option<SuperblockInfo>);
    impl MetadataVisitor for Maps {
        fn superblock_begin(&mut self, sb: &SuperblockInfo) -> io::Result<()> {
            self.1 = Some(sb.clone());
            Ok(())
        }
        fn mapping(&mut self, m: &Mapping) -> io::Result<()> {
            self.0.push(*m);
            Ok(())
        }
        fn reference(&mut self, _: &str) -> io::Result<()> {
            Ok(())
        }
        fn finish(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn remap_splits_and_joins_runs() {
        let u = used(&[0, 1, 2, 3, 90, 91, 97, 98]);
        let p = plan(&u, 100, 10).unwrap();
        let mut out = Maps::default();
        let mut r = Remap::new(&p, &mut out);
        let sb = SuperblockInfo {
            uuid: String::new(),
            time: 0,
            transaction: 0,
            flags: 0,
            version: 2,
            data_block_size: 128,
            nr_data_blocks: 100,
            metadata_snap: None,
        };
        r.superblock_begin(&sb).unwrap();
        let m = |o, d, len| Mapping {
            origin_begin: o,
            data_begin: d,
            len,
            time: 1,
        };
        r.mapping(&m(0, 2, 2)).unwrap();
        r.mapping(&m(2, 90, 2)).unwrap(); // -> 4, 5: joins the run before
        r.mapping(&m(10, 97, 2)).unwrap(); // -> 6, 7
        r.mapping(&m(20, 0, 1)).unwrap();
        r.superblock_end().unwrap();
        assert_eq!(out.1.unwrap().nr_data_blocks, 10);
        assert_eq!(out.0, vec![m(0, 2, 4), m(10, 6, 2), m(20, 0, 1)]);

        let mut out = Maps::default();
        let mut r = Remap::new(&p, &mut out);
        r.superblock_begin(&sb).unwrap();
        assert!(r.mapping(&m(0, 95, 1)).is_err(), "a block not planned");
    }
}
