//! Test helper for tests/kernel (the `lvm` scenario): makes blocks leak on
//! purpose, as a crashed or buggy writer would leave them.
//!
//!     leak_blocks METADATA_DEV NR_METADATA [NR_DATA]
//!
//! Gives NR_METADATA metadata blocks that nothing references (the highest
//! free ones) and NR_DATA unmapped data blocks (the highest free ones) one
//! reference each in the space maps, in one copy-on-write transaction of the
//! library (new space maps, superblock last). Nothing else changes: every
//! tree and device is as before, only the counts are too high, which is what
//! `thin_check` reports as "blocks have leaked". Prints the leaked block
//! numbers.

use std::path::Path;
use std::process::ExitCode;

use thinmeta::pdata::io::{BlockDevice, OpenMode};
use thinmeta::pdata::txn::Transaction;
use thinmeta::thin::superblock::{commit_transaction, read_superblock, SUPERBLOCK_LOCATION};

fn leak(path: &Path, nr_meta: u64, nr_data: u64) -> Result<(Vec<u64>, Vec<u64>), String> {
    let dev = BlockDevice::open(path, OpenMode::ReadWriteExclusive)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let sb = read_superblock(&dev, SUPERBLOCK_LOCATION).map_err(|e| e.to_string())?;
    let (msm, dsm) = (sb.metadata_sm(), sb.data_sm());
    let mut txn = Transaction::begin(&dev, dsm, msm).map_err(|e| e.to_string())?;
    let meta: Vec<u64> = (1..msm.nr_blocks)
        .rev()
        .filter(|&b| txn.meta_count(b) == 0)
        .take(nr_meta as usize)
        .collect();
    let data: Vec<u64> = (0..dsm.nr_blocks)
        .rev()
        .filter(|&b| txn.data_count(b) == 0)
        .take(nr_data as usize)
        .collect();
    if meta.len() as u64 != nr_meta || data.len() as u64 != nr_data {
        return Err(format!(
            "only {} free metadata and {} free data blocks",
            meta.len(),
            data.len()
        ));
    }
    for &b in &meta {
        txn.inc(b);
    }
    for &b in &data {
        txn.data_inc(b);
    }
    commit_transaction(txn, sb).map_err(|e| e.to_string())?;
    Ok((meta, data))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |s: &String| s.parse::<u64>().ok();
    let parsed = match args.as_slice() {
        [p, m] => num(m).map(|m| (p, m, 0)),
        [p, m, d] => num(m).zip(num(d)).map(|(m, d)| (p, m, d)),
        _ => None,
    };
    let Some((path, nr_meta, nr_data)) = parsed else {
        eprintln!("usage: leak_blocks METADATA_DEV NR_METADATA [NR_DATA]");
        return ExitCode::from(64);
    };
    match leak(Path::new(path), nr_meta, nr_data) {
        Ok((meta, data)) => {
            println!("leaked metadata blocks: {meta:?}");
            println!("leaked data blocks: {data:?}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("leak_blocks: {e}");
            ExitCode::from(65)
        }
    }
}
