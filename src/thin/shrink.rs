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
use std::os::unix::fs::FileExt;

use fixedbitset::FixedBitSet;

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

/// Plan moving the blocks of `used` (one bit per data block of the old
/// pool) at or above `new_nr_blocks` down to the lowest free blocks below
/// it, in order (runs stay runs where the free space allows).
pub fn plan(used: &FixedBitSet, new_nr_blocks: u64) -> Result<Plan, ShrinkError> {
    let old = used.len() as u64;
    if new_nr_blocks > old {
        return Err(ShrinkError::Grow {
            old,
            new: new_nr_blocks,
        });
    }
    let n = new_nr_blocks as usize;
    let used_blocks = used.count_ones(..) as u64;
    let below = used.count_ones(..n) as u64;
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
    let mut moves: Vec<Move> = Vec::new();
    let mut dest = (0..n).filter(|&b| !used.contains(b));
    for from in used.ones().skip_while(|&b| b < n) {
        // There are at least as many free blocks below n as blocks above.
        let Some(to) = dest.next() else { break };
        let (from, to) = (from as u64, to as u64);
        match moves.last_mut() {
            Some(m) if m.from + m.len == from && m.to + m.len == to => m.len += 1,
            _ => moves.push(Move { from, to, len: 1 }),
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
    pub used: FixedBitSet,
}

impl MetadataVisitor for UsedBlocks {
    fn superblock_begin(&mut self, sb: &SuperblockInfo) -> io::Result<()> {
        let nr = usize::try_from(sb.nr_data_blocks)
            .map_err(|_| other(format!("nr_data_blocks {} is too large", sb.nr_data_blocks)))?;
        // One bit per data block of the pool: a size that cannot be had is
        // an error, not an abort (an XML file can claim any size).
        let mut probe: Vec<usize> = Vec::new();
        probe
            .try_reserve_exact(nr.div_ceil(usize::BITS as usize))
            .map_err(|_| {
                other(format!(
                    "nr_data_blocks {nr}: the map of data blocks in use needs {} MiB of memory, which cannot be allocated",
                    nr.div_ceil(8 << 20)
                ))
            })?;
        drop(probe);
        self.used = FixedBitSet::with_capacity(nr);
        self.superblock = Some(sb.clone());
        Ok(())
    }
    fn superblock_end(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn def_begin(&mut self, _name: &str) -> io::Result<()> {
        Ok(())
    }
    fn def_end(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn device_begin(&mut self, _d: &DeviceInfo) -> io::Result<()> {
        Ok(())
    }
    fn device_end(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn mapping(&mut self, m: &Mapping) -> io::Result<()> {
        let nr = self.used.len() as u64;
        if m.data_begin >= nr || m.len > nr - m.data_begin {
            return Err(other(format!(
                "data block {} beyond nr_data_blocks {nr}",
                m.data_begin.saturating_add(m.len).saturating_sub(1)
            )));
        }
        self.used
            .insert_range(m.data_begin as usize..(m.data_begin + m.len) as usize);
        Ok(())
    }
    fn reference(&mut self, _name: &str) -> io::Result<()> {
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
        data.write_all_at(bytes, off).map_err(|e| {
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
    data.sync_all()
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

    fn used(nr: usize, blocks: &[usize]) -> FixedBitSet {
        let mut s = FixedBitSet::with_capacity(nr);
        for &b in blocks {
            s.insert(b);
        }
        s
    }

    #[test]
    fn plan_fills_the_lowest_free_blocks_in_order() {
        let u = used(100, &[0, 1, 2, 90, 91, 92, 95]);
        let p = plan(&u, 10).unwrap();
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
        let u = used(100, &[0, 1, 2, 3, 50]);
        assert!(plan(&u, 5).is_ok());
        match plan(&u, 4) {
            Err(ShrinkError::Insufficient {
                used: 5,
                above: 1,
                free: 0,
                new: 4,
                min: 5,
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(plan(&u, 101), Err(ShrinkError::Grow { .. })));
        assert!(plan(&u, 100).unwrap().moves.is_empty());
        assert!(plan(&used(10, &[]), 0).unwrap().moves.is_empty());
    }

    /// Collects mappings per device.
    #[derive(Default)]
    struct Maps(Vec<Mapping>, Option<SuperblockInfo>);
    impl MetadataVisitor for Maps {
        fn superblock_begin(&mut self, sb: &SuperblockInfo) -> io::Result<()> {
            self.1 = Some(sb.clone());
            Ok(())
        }
        fn superblock_end(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn def_begin(&mut self, _: &str) -> io::Result<()> {
            Ok(())
        }
        fn def_end(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn device_begin(&mut self, _: &DeviceInfo) -> io::Result<()> {
            Ok(())
        }
        fn device_end(&mut self) -> io::Result<()> {
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
        let u = used(100, &[0, 1, 2, 3, 90, 91, 97, 98]);
        let p = plan(&u, 10).unwrap();
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
