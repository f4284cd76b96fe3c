//! thin_migrate: copy a live, read-only thin device to another device or a
//! file, reading only its provisioned blocks.
//!
//! The thin device's table (`thin POOL DEV_ID [ORIGIN]`) names its pool and
//! device id; the pool's table (`thin-pool META DATA BLOCK_SECTORS ...`)
//! names the metadata device. The mappings come from the pool's held
//! metadata snapshot (the live metadata changes under a running pool); the
//! bytes are read from the thin device itself at the mapped offsets, and
//! written by [`crate::thin::extract::extract`] (unmapped ranges: holes in a
//! file, zeros on a device; with an external origin, the origin's bytes as
//! the thin device reads them).

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::dm::{DmTable, DmTarget};

/// A thin device as its device-mapper table describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinTable {
    /// Device number of the pool (the `-tpool` device).
    pub pool: u64,
    pub dev_id: u64,
    /// Device number of the external origin, if any.
    pub origin: Option<u64>,
    /// The device's size, sectors.
    pub sectors: u64,
}

/// A pool as its device-mapper table describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolTable {
    pub metadata: u64,
    pub data: u64,
    pub data_block_sectors: u64,
}

/// `MAJOR:MINOR` as the kernel prints it in tables, as a device number.
pub fn parse_dev(s: &str) -> Option<u64> {
    let (a, b) = s.split_once(':')?;
    let (ma, mi) = (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?);
    Some(libc::makedev(ma, mi))
}

fn single_target<'a>(t: &'a DmTable, kind: &str) -> Result<&'a DmTarget, String> {
    match t.targets.as_slice() {
        [one] if one.target_type == kind && one.start == 0 => Ok(one),
        targets => Err(format!(
            "device-mapper device {} is not a {kind} device (its table: {})",
            t.name,
            if targets.is_empty() {
                "empty".to_string()
            } else {
                targets
                    .iter()
                    .map(|x| format!("{} {} {} {}", x.start, x.length, x.target_type, x.params))
                    .collect::<Vec<_>>()
                    .join("; ")
            }
        )),
    }
}

/// A `thin` table: `POOL_DEV DEV_ID [EXTERNAL_ORIGIN_DEV]`.
pub fn parse_thin_table(t: &DmTable) -> Result<ThinTable, String> {
    let target = single_target(t, "thin")?;
    let bad = || {
        format!(
            "device-mapper device {}: cannot read its thin table '{}'",
            t.name, target.params
        )
    };
    let w: Vec<&str> = target.params.split_whitespace().collect();
    if w.len() < 2 || w.len() > 3 {
        return Err(bad());
    }
    Ok(ThinTable {
        pool: parse_dev(w[0]).ok_or_else(bad)?,
        dev_id: w[1].parse().map_err(|_| bad())?,
        origin: match w.get(2) {
            None => None,
            Some(o) => Some(parse_dev(o).ok_or_else(bad)?),
        },
        sectors: target.length,
    })
}

/// A `thin-pool` table: `META_DEV DATA_DEV BLOCK_SECTORS LOW_WATER [features]`.
pub fn parse_pool_table(t: &DmTable) -> Result<PoolTable, String> {
    let target = single_target(t, "thin-pool")?;
    let bad = || {
        format!(
            "device-mapper device {}: cannot read its thin-pool table '{}'",
            t.name, target.params
        )
    };
    let w: Vec<&str> = target.params.split_whitespace().collect();
    if w.len() < 4 {
        return Err(bad());
    }
    Ok(PoolTable {
        metadata: parse_dev(w[0]).ok_or_else(bad)?,
        data: parse_dev(w[1]).ok_or_else(bad)?,
        data_block_sectors: w[2].parse().map_err(|_| bad())?,
    })
}

/// A block device node for device number `rdev`: `/dev/block/M:m`, the
/// `DEVNAME` sysfs gives, or `/dev/mapper/NAME` of a device-mapper device;
/// the first that exists and has that number.
pub fn dev_node(rdev: u64) -> Option<PathBuf> {
    let (ma, mi) = (libc::major(rdev), libc::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{ma}:{mi}"));
    let mut candidates = vec![PathBuf::from(format!("/dev/block/{ma}:{mi}"))];
    if let Ok(u) = std::fs::read_to_string(sys.join("uevent")) {
        if let Some(n) = u.lines().find_map(|l| l.strip_prefix("DEVNAME=")) {
            candidates.push(Path::new("/dev").join(n));
        }
    }
    if let Ok(n) = std::fs::read_to_string(sys.join("dm/name")) {
        candidates.push(Path::new("/dev/mapper").join(n.trim()));
    }
    candidates.into_iter().find(|p| rdev_of(p) == Some(rdev))
}

/// The device number of block device node `p`.
pub fn rdev_of(p: &Path) -> Option<u64> {
    let md = std::fs::metadata(p).ok()?;
    md.file_type().is_block_device().then(|| md.rdev())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(kind: &str, params: &str) -> DmTable {
        DmTable {
            name: "x".into(),
            read_only: true,
            targets: vec![DmTarget {
                start: 0,
                length: 16384,
                target_type: kind.into(),
                params: params.into(),
            }],
        }
    }

    #[test]
    fn thin_and_pool_tables_are_read() {
        let t = parse_thin_table(&table("thin", "254:2 7")).unwrap();
        assert_eq!(
            t,
            ThinTable {
                pool: libc::makedev(254, 2),
                dev_id: 7,
                origin: None,
                sectors: 16384
            }
        );
        let t = parse_thin_table(&table("thin", "254:2 7 8:16")).unwrap();
        assert_eq!(t.origin, Some(libc::makedev(8, 16)));
        let p = parse_pool_table(&table(
            "thin-pool",
            "254:0 254:1 128 0 1 skip_block_zeroing",
        ))
        .unwrap();
        assert_eq!(
            p,
            PoolTable {
                metadata: libc::makedev(254, 0),
                data: libc::makedev(254, 1),
                data_block_sectors: 128
            }
        );
    }

    #[test]
    fn other_tables_are_refused() {
        let e = parse_thin_table(&table("linear", "8:0 0")).unwrap_err();
        assert!(e.contains("not a thin device"), "{e}");
        assert!(parse_thin_table(&table("thin", "254:2")).is_err());
        assert!(parse_thin_table(&table("thin", "254:2 x")).is_err());
        assert!(parse_pool_table(&table("thin-pool", "254:0 254:1")).is_err());
        assert!(parse_pool_table(&table("thin", "254:0 254:1 128 0")).is_err());
        let mut two = table("thin", "254:2 7");
        two.targets.push(two.targets[0].clone());
        assert!(parse_thin_table(&two).is_err());
        assert_eq!(parse_dev("254:17"), Some(libc::makedev(254, 17)));
        assert_eq!(parse_dev("25417"), None);
    }
}
