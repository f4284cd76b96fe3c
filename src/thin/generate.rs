//! thin_generate_metadata: a model of a pool that has lived for a while,
//! emitted as dump events (so [`crate::thin::restore::build_pool`] writes it
//! straight to a metadata device, or an [`crate::thin::dump::XmlWriter`]
//! prints it).
//!
//! The model (the same as `gen_thin_xml.py` of the shared test tools):
//!
//! * `origins` thin volumes whose logical space is cut into segments of
//!   [`SEG`] blocks (252: one full mapping leaf). A fraction `fill` of the
//!   segments is provisioned, the rest are holes; a fraction `partial` of
//!   the provisioned ones is only partly mapped (150..251 blocks).
//! * Initial provisioning interleaves all origins: the mapped space is cut
//!   into runs of 1..16 blocks, which are shuffled and laid out on the data
//!   device in that order (the fragmentation of a busy pool), at time 0.
//! * `snaps` epochs. In epoch `e` (pool time `e`) every origin is
//!   snapshotted (the snapshot shares all of the origin's current segment
//!   versions), then each origin takes `writes * segments` random write
//!   runs of 1..32 blocks, each to fresh consecutive data blocks, at time
//!   `e`. A segment hit in an epoch gets a new version: a copy of the old
//!   one with the written entries remapped (the kernel's copy-on-write of a
//!   shared leaf). A fraction `hole_writes` of the write runs instead
//!   provisions a whole hole segment.
//! * A segment version that two or more devices reference is emitted once
//!   as a `def` (named by its version index) and `ref`erenced by each of
//!   them, so it becomes one leaf shared by all their trees.
//!
//! Device ids: the origins are 1..=origins; the snapshots follow in the
//! order they were taken (epoch by epoch, origin by origin). Each device's
//! `transaction` is the pool transaction when it was created (as the kernel
//! records it, with LVM bumping the pool's transaction id once per created
//! device), and the superblock's is the number of devices created.
//!
//! The model is built once ([`Model::build`]) and can be emitted any number
//! of times ([`emit`]); memory is a few bytes per run of mappings (about 8
//! bytes per 8 blocks), not per block. Everything comes from a small
//! seeded PRNG, so the same parameters and seed give the same pool.

use std::io;

use crate::thin::dump::{DeviceInfo, Mapping, MetadataVisitor, SuperblockInfo};

/// Blocks per segment: one full mapping-tree leaf.
pub const SEG: usize = 252;

/// Largest number of snapshot epochs (times are kept in 16 bits).
pub const MAX_SNAPS: u32 = u16::MAX as u32;

/// Largest device id the kernel accepts (24 bits).
const MAX_DEV_ID: u64 = (1 << 24) - 1;

const NONE: u32 = u32::MAX;

/// The generator's parameters (defaults as in `gen_thin_xml.py`).
#[derive(Debug, Clone, PartialEq)]
pub struct GenParams {
    /// Origin volumes.
    pub origins: u32,
    /// Segments ([`SEG`] blocks each) per origin.
    pub segments: u32,
    /// Snapshot epochs (one snapshot of every origin in each).
    pub snaps: u32,
    /// Fraction of segments provisioned.
    pub fill: f64,
    /// Fraction of provisioned segments only partly mapped.
    pub partial: f64,
    /// Write runs per origin and epoch, as a fraction of `segments`.
    pub writes: f64,
    /// Fraction of write runs that provision a hole segment.
    pub hole_writes: f64,
    pub seed: u64,
    /// In 512-byte sectors.
    pub data_block_size: u32,
    /// nr_data_blocks = data blocks used * headroom (rounded up to 1024).
    pub headroom: f64,
    /// Also reserve a metadata snapshot of the written pool.
    pub metadata_snap: bool,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            origins: 1,
            segments: 40,
            snaps: 1,
            fill: 0.85,
            partial: 0.1,
            writes: 0.15,
            hole_writes: 0.02,
            seed: 42,
            data_block_size: 128,
            headroom: 1.25,
            metadata_snap: false,
        }
    }
}

impl GenParams {
    /// Why these parameters cannot describe a pool, if they cannot.
    pub fn validate(&self) -> Result<(), String> {
        let frac = |name: &str, v: f64| -> Result<(), String> {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("--{name} must be between 0 and 1 (got {v})"))
            }
        };
        if self.origins == 0 {
            return Err("--origins must be at least 1".into());
        }
        if self.segments == 0 {
            return Err("--segments must be at least 1".into());
        }
        if self.snaps > MAX_SNAPS {
            return Err(format!("--snaps must be at most {MAX_SNAPS}"));
        }
        let nr_devices = self.origins as u64 * (self.snaps as u64 + 1);
        if nr_devices > MAX_DEV_ID {
            return Err(format!(
                "{nr_devices} devices (origins * (snaps + 1)) is more than the kernel's {MAX_DEV_ID}"
            ));
        }
        if self.origins as u64 * self.segments as u64 >= NONE as u64 {
            return Err("origins * segments must be below 2^32".into());
        }
        frac("fill", self.fill)?;
        frac("partial", self.partial)?;
        frac("hole-writes", self.hole_writes)?;
        if !(self.writes.is_finite() && self.writes >= 0.0) {
            return Err(format!(
                "--writes must be a non-negative number (got {})",
                self.writes
            ));
        }
        if !(self.headroom.is_finite() && (1.0..=1e6).contains(&self.headroom)) {
            return Err(format!(
                "--headroom must be between 1 and 1000000 (got {})",
                self.headroom
            ));
        }
        let dbs = self.data_block_size;
        if !((128..=2_097_152).contains(&dbs) && dbs % 128 == 0) {
            return Err(format!(
                "--data-block-size: {dbs} sectors is not a multiple of 128 between 128 and 2097152"
            ));
        }
        Ok(())
    }
}

//------------------------------------------------------------------------------
// PRNG: xoshiro256** seeded through splitmix64.

struct Rng {
    s: [u64; 4],
}

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, n), n > 0 (multiply-shift, with rejection: unbiased).
    fn below(&mut self, n: u64) -> u64 {
        debug_assert!(n > 0);
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }

    /// Uniform in [lo, hi] (inclusive).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

//------------------------------------------------------------------------------
// The model

/// `len` blocks from offset `off` of a segment mapped to data blocks from
/// `data`, written at `time`. Runs of a version are in offset order and do
/// not overlap; neighbours may continue each other (merged when emitted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    data: u32,
    time: u16,
    off: u8,
    len: u8,
}

impl Run {
    fn end(&self) -> usize {
        self.off as usize + self.len as usize
    }
}

/// One version of a segment: a slice of the run arena.
#[derive(Debug, Clone, Copy)]
struct Version {
    start: u64,
    nr_runs: u16,
    /// Mapped blocks.
    count: u16,
    /// Which segment of its device's logical space.
    seg: u32,
}

struct Device {
    info: DeviceInfo,
    /// Version of each segment ([`NONE`]: a hole).
    segs: Vec<u32>,
}

/// Figures of a generated pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModelStats {
    pub devices: u64,
    /// Mapped blocks summed over all devices.
    pub total_mappings: u64,
    /// Entries in distinct leaves (shared ones counted once).
    pub distinct_entries: u64,
    pub segment_versions: u64,
    /// Versions referenced by two or more devices (defs).
    pub shared_versions: u64,
    pub data_blocks_used: u64,
    pub nr_data_blocks: u64,
}

/// A generated pool, in memory.
pub struct Model {
    params: GenParams,
    runs: Vec<Run>,
    versions: Vec<Version>,
    /// Devices referencing each version (saturating).
    refs: Vec<u16>,
    /// In dev_id order.
    devices: Vec<Device>,
    data_blocks_used: u64,
    nr_data_blocks: u64,
    transaction: u64,
}

/// Overlay a write of `len` blocks at `off` (data from `data`, at `time`)
/// onto the runs of a segment version.
fn overlay(runs: &mut Vec<Run>, off: usize, len: usize, data: u32, time: u16) {
    let end = off + len;
    let mut out = Vec::with_capacity(runs.len() + 2);
    let mut placed = false;
    for r in runs.iter() {
        if r.end() <= off {
            out.push(*r);
            continue;
        }
        if r.off as usize >= end {
            if !placed {
                out.push(Run {
                    data,
                    time,
                    off: off as u8,
                    len: len as u8,
                });
                placed = true;
            }
            out.push(*r);
            continue;
        }
        // Overlaps: keep what sticks out on either side.
        if (r.off as usize) < off {
            out.push(Run {
                len: (off - r.off as usize) as u8,
                ..*r
            });
        }
        if !placed {
            out.push(Run {
                data,
                time,
                off: off as u8,
                len: len as u8,
            });
            placed = true;
        }
        if r.end() > end {
            out.push(Run {
                data: r.data + (end - r.off as usize) as u32,
                time: r.time,
                off: end as u8,
                len: (r.end() - end) as u8,
            });
        }
    }
    if !placed {
        out.push(Run {
            data,
            time,
            off: off as u8,
            len: len as u8,
        });
    }
    *runs = out;
}

impl Model {
    /// Build the pool the parameters describe.
    pub fn build(p: &GenParams) -> Result<Model, String> {
        p.validate()?;
        let mut rng = Rng::new(p.seed);
        let nr_orig = p.origins as usize;
        let ns = p.segments as usize;
        let mut runs: Vec<Run> = Vec::new();
        let mut versions: Vec<Version> = Vec::new();
        // Current version of each origin segment, origin-major.
        let mut cur = vec![NONE; nr_orig * ns];

        // ---- initial provisioning: runs of 1..16 over each origin's mapped
        // space (cut at segment range ends), data assigned after a shuffle.
        for o in 0..nr_orig {
            let mut rem = 0usize; // rest of the current run, across segments
            for s in 0..ns {
                let mapped = rng.unit() < p.fill;
                if !mapped {
                    continue;
                }
                let (lo, hi) = if rng.unit() < p.partial {
                    let plen = rng.range(150, SEG as u64 - 1) as usize;
                    let start = rng.below((SEG - plen + 1) as u64) as usize;
                    (start, start + plen)
                } else {
                    (0, SEG)
                };
                let start = runs.len() as u64;
                let mut pos = lo;
                while pos < hi {
                    if rem == 0 {
                        rem = rng.range(1, 16) as usize;
                    }
                    let take = rem.min(hi - pos);
                    runs.push(Run {
                        data: 0,
                        time: 0,
                        off: pos as u8,
                        len: take as u8,
                    });
                    pos += take;
                    rem -= take;
                }
                cur[o * ns + s] = versions.len() as u32;
                versions.push(Version {
                    start,
                    nr_runs: (runs.len() as u64 - start) as u16,
                    count: (hi - lo) as u16,
                    seg: s as u32,
                });
            }
        }
        let initial: u64 = versions.iter().map(|v| v.count as u64).sum();
        if initial >= NONE as u64 {
            return Err(format!(
                "{initial} data blocks is more than this generator can number (2^32)"
            ));
        }
        {
            let mut order: Vec<u32> = (0..runs.len() as u32).collect();
            for i in (1..order.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
            let mut next = 0u32;
            for &i in &order {
                let r = &mut runs[i as usize];
                r.data = next;
                next += r.len as u32;
            }
        }
        let mut next_data = initial;

        // ---- snapshot epochs
        let nw = (p.writes * ns as f64).round() as u64;
        let mut snapshots: Vec<Vec<u32>> = Vec::with_capacity(nr_orig * p.snaps as usize);
        let mut slot = vec![NONE; ns];
        for e in 1..=p.snaps {
            for o in 0..nr_orig {
                snapshots.push(cur[o * ns..(o + 1) * ns].to_vec());
            }
            for o in 0..nr_orig {
                let cur_o = &mut cur[o * ns..(o + 1) * ns];
                let mapped: Vec<u32> = (0..ns as u32)
                    .filter(|&s| cur_o[s as usize] != NONE)
                    .collect();
                let mut holes: Vec<u32> = (0..ns as u32)
                    .filter(|&s| cur_o[s as usize] == NONE)
                    .collect();
                let mut touched: Vec<(u32, Vec<Run>)> = Vec::new();
                for _ in 0..nw {
                    let mut len = rng.range(1, 32) as usize;
                    let (s, off) = if rng.unit() < p.hole_writes {
                        if holes.is_empty() {
                            continue;
                        }
                        let i = rng.below(holes.len() as u64) as usize;
                        len = SEG;
                        (holes.swap_remove(i), 0)
                    } else {
                        if mapped.is_empty() {
                            continue;
                        }
                        let s = mapped[rng.below(mapped.len() as u64) as usize];
                        (s, rng.below((SEG - len + 1) as u64) as usize)
                    };
                    if next_data + len as u64 >= NONE as u64 {
                        return Err(
                            "more than 2^32 data blocks used; use fewer or smaller writes"
                                .to_string(),
                        );
                    }
                    let t = if slot[s as usize] == NONE {
                        slot[s as usize] = touched.len() as u32;
                        let v = cur_o[s as usize];
                        let copy = if v == NONE {
                            Vec::new()
                        } else {
                            let v = &versions[v as usize];
                            runs[v.start as usize..v.start as usize + v.nr_runs as usize].to_vec()
                        };
                        touched.push((s, copy));
                        touched.len() - 1
                    } else {
                        slot[s as usize] as usize
                    };
                    overlay(&mut touched[t].1, off, len, next_data as u32, e as u16);
                    next_data += len as u64;
                }
                for (s, rs) in touched {
                    slot[s as usize] = NONE;
                    let start = runs.len() as u64;
                    let count: usize = rs.iter().map(|r| r.len as usize).sum();
                    runs.extend_from_slice(&rs);
                    cur_o[s as usize] = versions.len() as u32;
                    versions.push(Version {
                        start,
                        nr_runs: rs.len() as u16,
                        count: count as u16,
                        seg: s,
                    });
                }
                if versions.len() as u64 >= NONE as u64 {
                    return Err("more than 2^32 segment versions".into());
                }
            }
        }

        // ---- devices: origins, then snapshots in the order they were taken
        let snaps = p.snaps as u64;
        let nr_devices = nr_orig as u64 * (snaps + 1);
        let mut devices = Vec::with_capacity(nr_devices as usize);
        let mut refs = vec![0u16; versions.len()];
        let mapped_blocks = |segs: &[u32]| -> u64 {
            segs.iter()
                .filter(|&&v| v != NONE)
                .map(|&v| versions[v as usize].count as u64)
                .sum()
        };
        for o in 0..nr_orig {
            let segs = cur[o * ns..(o + 1) * ns].to_vec();
            let id = o as u64 + 1;
            devices.push(Device {
                info: DeviceInfo {
                    dev_id: id,
                    mapped_blocks: mapped_blocks(&segs),
                    transaction: id - 1,
                    creation_time: 0,
                    snap_time: snaps,
                },
                segs,
            });
        }
        for (k, segs) in snapshots.into_iter().enumerate() {
            let id = nr_orig as u64 + 1 + k as u64;
            let epoch = k as u64 / nr_orig as u64 + 1;
            devices.push(Device {
                info: DeviceInfo {
                    dev_id: id,
                    mapped_blocks: mapped_blocks(&segs),
                    transaction: id - 1,
                    creation_time: epoch,
                    snap_time: epoch,
                },
                segs,
            });
        }
        for d in &devices {
            for &v in d.segs.iter().filter(|&&v| v != NONE) {
                let r = &mut refs[v as usize];
                *r = r.saturating_add(1);
            }
        }
        let nr_data_blocks = (next_data as f64 * p.headroom) as u64 / 1024 * 1024 + 1024;
        Ok(Model {
            params: p.clone(),
            runs,
            versions,
            refs,
            devices,
            data_blocks_used: next_data,
            nr_data_blocks,
            transaction: nr_devices,
        })
    }

    pub fn params(&self) -> &GenParams {
        &self.params
    }

    pub fn stats(&self) -> ModelStats {
        ModelStats {
            devices: self.devices.len() as u64,
            total_mappings: self.devices.iter().map(|d| d.info.mapped_blocks).sum(),
            distinct_entries: self
                .versions
                .iter()
                .zip(&self.refs)
                .filter(|(_, &r)| r > 0)
                .map(|(v, _)| v.count as u64)
                .sum(),
            segment_versions: self.versions.len() as u64,
            shared_versions: self.refs.iter().filter(|&&r| r >= 2).count() as u64,
            data_blocks_used: self.data_blocks_used,
            nr_data_blocks: self.nr_data_blocks,
        }
    }

    pub fn superblock_info(&self) -> SuperblockInfo {
        SuperblockInfo {
            uuid: String::new(),
            time: self.params.snaps as u64,
            transaction: self.transaction,
            flags: 0,
            version: 2,
            data_block_size: self.params.data_block_size,
            nr_data_blocks: self.nr_data_blocks,
            metadata_snap: None,
        }
    }

    fn version_runs(&self, v: u32) -> (&Version, &[Run]) {
        let ver = &self.versions[v as usize];
        let s = ver.start as usize;
        (ver, &self.runs[s..s + ver.nr_runs as usize])
    }
}

/// Merges runs into mappings: same time, consecutive virtual and data blocks.
struct Merger {
    cur: Option<Mapping>,
}

impl Merger {
    fn push(&mut self, out: &mut dyn MetadataVisitor, m: Mapping) -> io::Result<()> {
        if let Some(c) = &mut self.cur {
            if c.origin_begin + c.len == m.origin_begin
                && c.data_begin + c.len == m.data_begin
                && c.time == m.time
            {
                c.len += m.len;
                return Ok(());
            }
            out.mapping(c)?;
        }
        self.cur = Some(m);
        Ok(())
    }

    fn flush(&mut self, out: &mut dyn MetadataVisitor) -> io::Result<()> {
        match self.cur.take() {
            Some(c) => out.mapping(&c),
            None => Ok(()),
        }
    }

    fn version(&mut self, out: &mut dyn MetadataVisitor, model: &Model, v: u32) -> io::Result<()> {
        let (ver, runs) = model.version_runs(v);
        let base = ver.seg as u64 * SEG as u64;
        for r in runs {
            self.push(
                out,
                Mapping {
                    origin_begin: base + r.off as u64,
                    data_begin: r.data as u64,
                    len: r.len as u64,
                    time: r.time as u32,
                },
            )?;
        }
        Ok(())
    }
}

/// Send the model's events to `out`: the superblock, one `def` per shared
/// segment version (in version order), then every device in id order with
/// its mappings and `ref`s in virtual-block order.
pub fn emit(model: &Model, out: &mut dyn MetadataVisitor) -> io::Result<()> {
    let mut name = itoa::Buffer::new();
    let mut m = Merger { cur: None };
    out.superblock_begin(&model.superblock_info())?;
    for (v, _) in model.refs.iter().enumerate().filter(|(_, &r)| r >= 2) {
        out.def_begin(name.format(v))?;
        m.version(out, model, v as u32)?;
        m.flush(out)?;
        out.def_end()?;
    }
    for d in &model.devices {
        out.device_begin(&d.info)?;
        for &v in d.segs.iter().filter(|&&v| v != NONE) {
            if model.refs[v as usize] >= 2 {
                m.flush(out)?;
                out.reference(name.format(v))?;
            } else {
                m.version(out, model, v)?;
            }
        }
        m.flush(out)?;
        out.device_end()?;
    }
    out.superblock_end()?;
    out.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pdata::io::{BlockDevice, OpenMode};
    use crate::thin::check::{check, CheckOptions};
    use crate::thin::dump::{dump, DumpOptions, XmlWriter};
    use crate::thin::restore::{build_pool, BuildError, BuiltPool, Overrides};
    use crate::thin::superblock::{read_superblock, SUPERBLOCK_LOCATION};
    use std::collections::HashMap;

    fn small() -> GenParams {
        GenParams {
            origins: 2,
            segments: 60,
            snaps: 3,
            writes: 0.3,
            hole_writes: 0.1,
            seed: 7,
            ..GenParams::default()
        }
    }

    fn xml(model: &Model) -> Vec<u8> {
        let mut w = XmlWriter::new(Vec::new());
        emit(model, &mut w).unwrap();
        w.into_inner()
    }

    fn image(nr_blocks: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(nr_blocks * 4096).unwrap();
        f
    }

    fn write(model: &Model, f: &tempfile::NamedTempFile) -> Result<BuiltPool, BuildError> {
        let dev = BlockDevice::open(f.path(), OpenMode::ReadWriteExclusive).unwrap();
        build_pool(
            &dev,
            Overrides::default(),
            model.params().metadata_snap,
            |b, _| emit(model, b).map_err(|e| BuildError::Input(e.to_string())),
        )
    }

    use crate::thin::dump::testutil::Collect;

    #[test]
    fn prng_is_stable() {
        // The generator's output depends on these exact values.
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0x99ec_5f36_cb75_f2b4);
        let mut r = Rng::new(42);
        for n in [1u64, 2, 3, 252, 1 << 40] {
            for _ in 0..1000 {
                assert!(r.below(n) < n);
            }
        }
        let u = r.unit();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn overlay_splits_and_replaces() {
        let mut rs = vec![
            Run {
                data: 100,
                time: 0,
                off: 0,
                len: 10,
            },
            Run {
                data: 200,
                time: 0,
                off: 20,
                len: 10,
            },
        ];
        overlay(&mut rs, 5, 20, 1000, 1);
        assert_eq!(
            rs,
            vec![
                Run {
                    data: 100,
                    time: 0,
                    off: 0,
                    len: 5
                },
                Run {
                    data: 1000,
                    time: 1,
                    off: 5,
                    len: 20
                },
                Run {
                    data: 205,
                    time: 0,
                    off: 25,
                    len: 5
                },
            ]
        );
        overlay(&mut rs, 40, 3, 2000, 2);
        assert_eq!(
            rs.last().unwrap(),
            &Run {
                data: 2000,
                time: 2,
                off: 40,
                len: 3
            }
        );
        overlay(&mut rs, 12, 1, 3000, 2);
        assert_eq!(
            rs[1],
            Run {
                data: 1000,
                time: 1,
                off: 5,
                len: 7
            }
        );
        assert_eq!(
            rs[2],
            Run {
                data: 3000,
                time: 2,
                off: 12,
                len: 1
            }
        );
        assert_eq!(
            rs[3],
            Run {
                data: 1008,
                time: 1,
                off: 13,
                len: 12
            }
        );
    }

    #[test]
    fn model_is_consistent() {
        let p = small();
        let model = Model::build(&p).unwrap();
        let st = model.stats();
        assert_eq!(st.devices, 2 * 4);
        assert!(st.shared_versions > 0);
        let mut c = Collect::default();
        emit(&model, &mut c).unwrap();
        let sb = c.sb.unwrap();
        assert_eq!(sb.time, 3);
        assert_eq!(sb.transaction, 8);
        assert_eq!(sb.nr_data_blocks % 1024, 0);
        assert!(sb.nr_data_blocks >= st.data_blocks_used);
        assert!(c.refs > 0);
        let ids: Vec<u64> = c.devs.keys().copied().collect();
        assert_eq!(ids, (1..=8).collect::<Vec<_>>());
        let mut total = 0;
        let mut data_owner: HashMap<u64, (u64, u32)> = HashMap::new();
        for (id, (d, maps)) in &c.devs {
            assert_eq!(d.mapped_blocks, maps.len() as u64, "device {id}");
            total += d.mapped_blocks;
            assert!(maps.windows(2).all(|w| w[0].0 < w[1].0), "keys in order");
            assert!(maps.iter().all(|m| m.2 as u64 <= d.snap_time));
            assert!(maps.iter().all(|m| m.1 < st.data_blocks_used));
            if *id > 2 {
                let k = id - 3;
                assert_eq!(d.creation_time, k / 2 + 1);
                assert_eq!(d.snap_time, k / 2 + 1);
            } else {
                assert_eq!((d.creation_time, d.snap_time), (0, 3));
            }
            // A data block always holds the same virtual block at the same time.
            for &(k, b, t) in maps {
                let e = data_owner.entry(b).or_insert((k, t));
                assert_eq!(*e, (k, t), "data block {b}");
            }
        }
        assert_eq!(total, st.total_mappings);
        // Data blocks are used exactly once each, none skipped... except
        // those overwritten in the same epoch before a snapshot saw them.
        assert!(data_owner.len() as u64 <= st.data_blocks_used);
        assert!(data_owner.len() as u64 >= st.distinct_entries / 2);
        // Snapshot k of origin o at epoch e equals the origin before epoch e's writes:
        // the last snapshot of each origin differs from it only in written blocks.
        let o1 = &c.devs[&1].1;
        let s1 = &c.devs[&7].1; // origin 1 at epoch 3
        let origin: HashMap<u64, (u64, u32)> = o1.iter().map(|&(k, b, t)| (k, (b, t))).collect();
        for &(k, b, t) in s1 {
            if let Some(&(ob, ot)) = origin.get(&k) {
                assert!((ob, ot) == (b, t) || ot == 3, "block {k}");
            }
        }
    }

    #[test]
    fn deterministic() {
        let p = small();
        let a = xml(&Model::build(&p).unwrap());
        let b = xml(&Model::build(&p).unwrap());
        assert_eq!(a, b);
        let other = xml(&Model::build(&GenParams {
            seed: 8,
            ..p.clone()
        })
        .unwrap());
        assert_ne!(a, other);

        let m = Model::build(&p).unwrap();
        let (f1, f2) = (image(1024), image(1024));
        write(&m, &f1).unwrap();
        write(&Model::build(&p).unwrap(), &f2).unwrap();
        let (x, y) = (
            std::fs::read(f1.path()).unwrap(),
            std::fs::read(f2.path()).unwrap(),
        );
        assert!(x == y, "binary output differs");
    }

    #[test]
    fn xml_reads_back() {
        let model = Model::build(&small()).unwrap();
        let text = xml(&model);
        let s = String::from_utf8(text.clone()).unwrap();
        assert!(s.contains("<def name=") && s.contains("<ref name="));
        let mut direct = Collect::default();
        emit(&model, &mut direct).unwrap();
        let mut back = Collect::default();
        crate::thin::xml_read::read_xml(&text[..], &mut back).unwrap();
        assert_eq!(back.sb, direct.sb);
        assert_eq!(back.devs, direct.devs);
    }

    #[test]
    fn written_pool_passes_check_and_shares_leaves() {
        let model = Model::build(&small()).unwrap();
        let f = image(1024);
        let built = write(&model, &f).unwrap();
        assert_eq!(built.nr_devices, 8);
        let dev = BlockDevice::open(f.path(), OpenMode::ReadOnly).unwrap();
        let report = check(&dev, &CheckOptions::default(), &mut |_, _| {});
        assert!(report.passed(false), "{:?}", report.findings);

        let mut w = XmlWriter::new(Vec::new());
        dump(&dev, &DumpOptions::default(), &mut w, &mut |_, _| {}).unwrap();
        let dumped = w.into_inner();
        assert!(String::from_utf8_lossy(&dumped).contains("<ref"));
        // Same pool, whatever the def names.
        let (mut a, mut b) = (Collect::default(), Collect::default());
        emit(&model, &mut a).unwrap();
        crate::thin::xml_read::read_xml(&dumped[..], &mut b).unwrap();
        assert_eq!(a.devs, b.devs);
        assert_eq!(a.sb.unwrap().nr_data_blocks, b.sb.unwrap().nr_data_blocks);
    }

    #[test]
    fn metadata_snap() {
        let p = GenParams {
            metadata_snap: true,
            ..small()
        };
        let model = Model::build(&p).unwrap();
        let f = image(1024);
        write(&model, &f).unwrap();
        let dev = BlockDevice::open(f.path(), OpenMode::ReadOnly).unwrap();
        let sb = read_superblock(&dev, SUPERBLOCK_LOCATION).unwrap();
        assert_ne!(sb.metadata_snap, 0);
        let report = check(&dev, &CheckOptions::default(), &mut |_, _| {});
        assert!(report.passed(false), "{:?}", report.findings);
    }

    #[test]
    fn too_small_is_refused() {
        let model = Model::build(&small()).unwrap();
        let f = image(8);
        match write(&model, &f) {
            Err(BuildError::TooSmall { needed, available }) => {
                assert!(needed > available);
                assert_eq!(available, 8);
            }
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("an 8-block device cannot hold the pool"),
        }
    }

    #[test]
    fn bad_params_are_refused() {
        for p in [
            GenParams {
                origins: 0,
                ..GenParams::default()
            },
            GenParams {
                fill: 1.5,
                ..GenParams::default()
            },
            GenParams {
                headroom: 0.5,
                ..GenParams::default()
            },
            GenParams {
                data_block_size: 100,
                ..GenParams::default()
            },
            GenParams {
                snaps: 70000,
                ..GenParams::default()
            },
        ] {
            assert!(Model::build(&p).is_err(), "{p:?}");
        }
    }

    #[test]
    fn defaults_and_edge_cases() {
        for p in [
            GenParams::default(),
            GenParams {
                snaps: 0,
                ..GenParams::default()
            },
            GenParams {
                fill: 0.0,
                ..small()
            },
            GenParams {
                fill: 1.0,
                partial: 1.0,
                ..small()
            },
            GenParams {
                writes: 0.0,
                ..small()
            },
        ] {
            let m = Model::build(&p).unwrap();
            let mut c = Collect::default();
            emit(&m, &mut c).unwrap();
            for (d, maps) in c.devs.values() {
                assert_eq!(d.mapped_blocks, maps.len() as u64);
            }
        }
    }
}
