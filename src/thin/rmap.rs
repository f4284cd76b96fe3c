//! thin_rmap: which thin devices' virtual blocks map the given data blocks.
//!
//! As the peer: the devices of the live top-level mapping tree are walked in
//! id order and every distinct leaf is read once, for the first device that
//! reaches it (a leaf shared with a later device is not listed again for
//! that device). Mappings into the regions are merged into runs (same
//! device, consecutive virtual and data blocks) in that reading order, and
//! the runs are printed sorted by data begin, data end, device, virtual
//! begin.

use std::fmt;
use std::ops::Range;

use crate::pdata::btree::Walker;
use crate::pdata::io::BlockDevice;
use crate::thin::device::BlockTime;
use crate::thin::dump::select_superblock;
use crate::thin::Error;

/// Data blocks `data_begin..data_end` are mapped by thin device `dev_id`
/// from virtual block `thin_begin` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RmapRun {
    pub data_begin: u64,
    pub data_end: u64,
    pub dev_id: u32,
    pub thin_begin: u64,
}

impl fmt::Display for RmapRun {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "data {}..{} -> thin({}) {}..{}",
            self.data_begin,
            self.data_end,
            self.dev_id,
            self.thin_begin,
            self.thin_begin + (self.data_end - self.data_begin)
        )
    }
}

/// Parse `BEGIN..END` (END excluded, greater than BEGIN).
pub fn parse_region(s: &str) -> Result<Range<u64>, String> {
    let (b, e) = s
        .split_once("..")
        .ok_or_else(|| format!("'{s}' is not a block range BEGIN..END"))?;
    let num = |v: &str| -> Result<u64, String> {
        if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
            return Err(format!("'{s}' is not a block range BEGIN..END"));
        }
        v.parse::<u64>()
            .map_err(|_| format!("'{s}': {v} is too large for a block number"))
    };
    let (b, e) = (num(b)?, num(e)?);
    if e <= b {
        return Err(format!(
            "'{s}': the end ({e}) must be greater than the begin ({b})"
        ));
    }
    Ok(b..e)
}

/// Sorted, merged regions: a membership test by binary search.
struct Regions(Vec<Range<u64>>);

impl Regions {
    fn new(regions: &[Range<u64>]) -> Regions {
        let mut v: Vec<Range<u64>> = regions.to_vec();
        v.sort_by_key(|r| r.start);
        let mut merged: Vec<Range<u64>> = Vec::with_capacity(v.len());
        for r in v {
            match merged.last_mut() {
                Some(m) if r.start <= m.end => m.end = m.end.max(r.end),
                _ => merged.push(r),
            }
        }
        Regions(merged)
    }

    #[inline]
    fn contains(&self, b: u64) -> bool {
        let i = self.0.partition_point(|r| r.end <= b);
        i < self.0.len() && self.0[i].start <= b
    }
}

/// Builds the runs in reading order.
#[derive(Default)]
struct Runs {
    done: Vec<RmapRun>,
    cur: Option<RmapRun>,
}

impl Runs {
    #[inline]
    fn push(&mut self, dev_id: u32, vblock: u64, data: u64) {
        if let Some(c) = &mut self.cur {
            if c.dev_id == dev_id
                && data == c.data_end
                && vblock == c.thin_begin + (c.data_end - c.data_begin)
            {
                c.data_end += 1;
                return;
            }
        }
        if let Some(c) = self.cur.replace(RmapRun {
            data_begin: data,
            data_end: data + 1,
            dev_id,
            thin_begin: vblock,
        }) {
            self.done.push(c);
        }
    }

    fn finish(mut self) -> Vec<RmapRun> {
        if let Some(c) = self.cur.take() {
            self.done.push(c);
        }
        self.done.sort_unstable();
        self.done
    }
}

/// The reverse map of `regions` (data block ranges) in the live metadata.
pub fn rmap(dev: &BlockDevice, regions: &[Range<u64>]) -> Result<Vec<RmapRun>, Error> {
    let sb = select_superblock(dev, None)?;
    let regions = Regions::new(regions);
    let mut walker = Walker::new(dev);
    let top = walker.read_map::<u64>(sb.mapping_root, |_| {});
    if let Some(i) = top.issues.iter().find(|i| i.fatal) {
        return Err(Error::metadata("mapping tree (top level)", i.error.clone()));
    }
    let mut runs = Runs::default();
    for (dev_id, root) in top.entries {
        let before = walker.issues.len();
        walker.walk(root, 8);
        if let Some(i) = walker.issues[before..].iter().find(|i| i.fatal) {
            return Err(Error::metadata(
                format!("mapping tree of device {dev_id}"),
                i.error.clone(),
            ));
        }
        // The leaves this device reaches first, in key order.
        let fresh = walker.take_fresh_leaves();
        let w = &walker;
        dev.read_in_order(&fresh, 1024, |_, b, data| -> Result<(), Error> {
            let node = data
                .and_then(|d| w.check_leaf(b, d, 8))
                .map_err(|e| Error::metadata(format!("mapping tree of device {dev_id}"), e))?;
            for i in 0..node.nr_entries() {
                let bt = BlockTime::unpack(node.value::<u64>(i));
                if regions.contains(bt.block) {
                    runs.push(dev_id as u32, node.key(i), bt.block);
                }
            }
            Ok(())
        })?;
    }
    Ok(runs.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_parse_like_the_peer() {
        assert_eq!(parse_region("0..18446744073709551615"), Ok(0..u64::MAX));
        assert_eq!(parse_region("5..45"), Ok(5..45));
        for bad in [
            "0",
            "0.10",
            "..",
            "0..10,",
            "0..10..",
            "foo",
            "foo..10",
            "0..bar",
            "-1..0",
            "0..-1",
            "0..0",
            "18446744073709551615..0",
            "7..3",
            "0..18446744073709551616",
        ] {
            assert!(parse_region(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn region_membership() {
        let r = Regions::new(&[10..20, 0..5, 15..30, 40..41]);
        assert_eq!(r.0, vec![0..5, 10..30, 40..41]);
        for (b, want) in [
            (0, true),
            (4, true),
            (5, false),
            (9, false),
            (10, true),
            (29, true),
            (30, false),
            (40, true),
            (41, false),
        ] {
            assert_eq!(r.contains(b), want, "{b}");
        }
    }

    #[test]
    fn runs_merge_only_when_device_virtual_and_data_blocks_continue() {
        let mut r = Runs::default();
        r.push(1, 0, 10);
        r.push(1, 1, 11);
        r.push(1, 3, 12); // virtual gap
        r.push(2, 4, 13); // other device
        r.push(2, 5, 13); // data not consecutive
        let v = r.finish();
        let s: Vec<String> = v.iter().map(|r| r.to_string()).collect();
        assert_eq!(
            s,
            vec![
                "data 10..12 -> thin(1) 0..2",
                "data 12..13 -> thin(1) 3..4",
                "data 13..14 -> thin(2) 4..5",
                "data 13..14 -> thin(2) 5..6",
            ]
        );
    }
}
