//! thin_ls: each thin device's usage of the pool (mapped, exclusive and
//! shared blocks, highest mapped block) and details, as the peer's table.
//!
//! Sharing is decided as the peer decides it, from the trees of the listed
//! superblock only (the live one, or the metadata snapshot's):
//!
//! * every mapping in a leaf that more than one device reaches (the leaf
//!   itself, or a node above it, is shared) is shared;
//! * a mapping in a leaf that only one device reaches is shared when its
//!   data block is also referenced by another distinct leaf (or twice by
//!   this one); otherwise it is exclusive.
//!
//! "Reached by more than one device" is counted by paths: a leaf that
//! appears more than once in all the devices' leaf sequences (which the
//! walker replays for shared subtrees) is shared. That equals the peer's
//! rule "the leaf, or some node on its path, has more than one parent".
//!
//! One pass reads each distinct leaf once. A byte (or two, or four, by
//! the number of devices) per data block records who referenced it so far,
//! so a second reference can be charged to the device of the first one
//! at once, without reading its leaf again.

use std::io::{self, Write};

use crate::pdata::btree::Walker;
use crate::pdata::io::BlockDevice;
use crate::thin::device::{BlockTime, DeviceDetails};
use crate::thin::dump::select_superblock;
use crate::thin::metadata::{Devices, ThinDevice};
use crate::thin::Error;

/// A column of the listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Dev,
    MappedBlocks,
    ExclusiveBlocks,
    SharedBlocks,
    HighestBlock,
    MappedSectors,
    ExclusiveSectors,
    SharedSectors,
    HighestSector,
    MappedBytes,
    ExclusiveBytes,
    SharedBytes,
    HighestByte,
    Mapped,
    Exclusive,
    Shared,
    HighestMapped,
    Transaction,
    CreateTime,
    SnapTime,
}

/// Every field, by name, in the peer's order.
pub const ALL_FIELDS: &[(&str, Field)] = &[
    ("DEV", Field::Dev),
    ("MAPPED_BLOCKS", Field::MappedBlocks),
    ("EXCLUSIVE_BLOCKS", Field::ExclusiveBlocks),
    ("SHARED_BLOCKS", Field::SharedBlocks),
    ("HIGHEST_BLOCK", Field::HighestBlock),
    ("MAPPED_SECTORS", Field::MappedSectors),
    ("EXCLUSIVE_SECTORS", Field::ExclusiveSectors),
    ("SHARED_SECTORS", Field::SharedSectors),
    ("HIGHEST_SECTOR", Field::HighestSector),
    ("MAPPED_BYTES", Field::MappedBytes),
    ("EXCLUSIVE_BYTES", Field::ExclusiveBytes),
    ("SHARED_BYTES", Field::SharedBytes),
    ("HIGHEST_BYTE", Field::HighestByte),
    ("MAPPED", Field::Mapped),
    ("EXCLUSIVE", Field::Exclusive),
    ("SHARED", Field::Shared),
    ("HIGHEST_MAPPED", Field::HighestMapped),
    ("TRANSACTION", Field::Transaction),
    ("CREATE_TIME", Field::CreateTime),
    ("SNAP_TIME", Field::SnapTime),
];

/// The columns printed without `--format`.
pub const DEFAULT_FIELDS: &[Field] = &[
    Field::Dev,
    Field::Mapped,
    Field::CreateTime,
    Field::SnapTime,
];

impl Field {
    /// The field called `name` (exact, upper case).
    pub fn parse(name: &str) -> Option<Field> {
        ALL_FIELDS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
    }

    pub fn name(self) -> &'static str {
        ALL_FIELDS.iter().find(|(_, f)| *f == self).unwrap().0
    }

    /// True for fields that need the mapping trees read.
    pub fn needs_mappings(self) -> bool {
        !matches!(
            self,
            Field::Dev | Field::Transaction | Field::CreateTime | Field::SnapTime
        )
    }
}

/// One device's row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceUsage {
    pub dev_id: u64,
    pub details: DeviceDetails,
    /// Mappings in the device's tree (not the details' `mapped_blocks`).
    pub mapped: u64,
    pub shared: u64,
    /// Highest mapped virtual block (0 when nothing is mapped).
    pub highest: u64,
}

impl DeviceUsage {
    pub fn exclusive(&self) -> u64 {
        self.mapped - self.shared
    }
}

/// What thin_ls prints.
#[derive(Debug, Clone)]
pub struct Listing {
    /// In 512-byte sectors.
    pub data_block_size: u32,
    pub devices: Vec<DeviceUsage>,
}

/// List the devices of the live metadata, or of the metadata snapshot.
/// Without `count_mappings` only the device lists are read and the counts
/// are 0. `progress(done, total)` follows the leaves read.
pub fn list(
    dev: &BlockDevice,
    metadata_snap: bool,
    count_mappings: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Listing, Error> {
    let sb = select_superblock(dev, metadata_snap.then_some(None))?;
    let mut walker = Walker::new(dev);
    let devices = Devices::read(&mut walker, &sb, false);
    if let Some((tree, e)) = devices.first_fatal() {
        return Err(Error::metadata(tree, e.clone()));
    }
    let (devs, errs) = devices.joined();
    if let Some(e) = errs.into_iter().next() {
        return Err(Error::Inconsistent(format!("inconsistent device ids: {e}")));
    }
    let mut rows: Vec<DeviceUsage> = devs
        .iter()
        .map(|d| DeviceUsage {
            dev_id: d.id,
            details: d.details,
            mapped: 0,
            shared: 0,
            highest: 0,
        })
        .collect();
    if count_mappings {
        // A metadata snapshot's superblock copy has no space maps: the data
        // device's size comes from the live superblock.
        let data_sm = if metadata_snap {
            select_superblock(dev, None)?.data_sm()
        } else {
            sb.data_sm()
        };
        // Each 16320 data blocks need a bitmap on the metadata device: a
        // larger count is damage, not something to allocate counts for.
        if data_sm.nr_bitmaps() > dev.nr_blocks() {
            return Err(Error::Inconsistent(format!(
                "superblock: the data space map claims {} blocks; their bitmaps cannot fit the {}-block metadata device",
                data_sm.nr_blocks,
                dev.nr_blocks()
            )));
        }
        let nr_data_blocks = data_sm.nr_blocks;
        count(&mut walker, &devs, nr_data_blocks, &mut rows, progress)?;
    }
    Ok(Listing {
        data_block_size: sb.data_block_size,
        devices: rows,
    })
}

/// Leaves per batch passed from the reading thread to the counting one.
const LEAF_BATCH: usize = 256;

/// Leaves read and checked, for counting.
#[derive(Default)]
struct LeafBatch {
    /// Per leaf: its index in the sorted leaf list, number of mappings, last key.
    leaves: Vec<(usize, u8, u64)>,
    /// The data blocks the leaves map, leaf after leaf.
    blocks: Vec<u64>,
}

/// `leaf_owner` value of a leaf reached by more than one path.
const SHARED_LEAF: u32 = u32::MAX;
/// `leaf_owner` value of a block no device reaches as a leaf.
const NO_LEAF: u32 = u32::MAX - 1;

fn count(
    walker: &mut Walker,
    devs: &[ThinDevice],
    nr_data_blocks: u64,
    rows: &mut [DeviceUsage],
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), Error> {
    let dev = walker.device();
    let mut trees = Vec::with_capacity(devs.len());
    for d in devs {
        let before = walker.issues.len();
        trees.push(walker.walk(d.root, 8));
        if let Some(issue) = walker.issues[before..].iter().find(|i| i.fatal) {
            return Err(Error::metadata(
                format!("mapping tree of device {}", d.id),
                issue.error.clone(),
            ));
        }
    }

    // Which device reaches each leaf, or that several paths do.
    let mut leaf_owner = vec![NO_LEAF; dev.nr_blocks() as usize];
    for (i, t) in trees.iter().enumerate() {
        for &l in walker.leaves(t) {
            let o = &mut leaf_owner[l as usize];
            *o = if *o == NO_LEAF { i as u32 } else { SHARED_LEAF };
        }
    }

    // Read each distinct leaf once, in block order.
    let mut leaves = walker.take_fresh_leaves();
    leaves.sort_unstable();
    // Per leaf (in `leaves` order): number of mappings and last key.
    // (Two vectors: a vector of pairs would pad each to 16 bytes.)
    let mut summary_nr: Vec<u8> = vec![0; leaves.len()];
    let mut summary_last: Vec<u64> = vec![0; leaves.len()];
    let mut excl_shared = vec![0u64; devs.len()];
    let mut owners = DataOwners::new(devs.len(), nr_data_blocks);
    let total = leaves.len() as u64;
    let mut done = 0u64;
    progress(0, total);
    let w: &Walker = walker;
    let leaf_owner = &leaf_owner;
    let leaves_ref = &leaves;
    // Two threads: this one reads, checks and unpacks the leaves (in block
    // order, in batches), the other counts their data references.
    std::thread::scope(|scope| -> Result<(), Error> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<LeafBatch>(2);
        // Counted batches go back to the reader to be refilled.
        let (back_tx, back_rx) = std::sync::mpsc::channel::<LeafBatch>();
        let reader = std::thread::Builder::new()
            .spawn_scoped(scope, move || -> Result<(), Error> {
                let mut batch = LeafBatch::default();
                dev.read_in_order(leaves_ref, 512, |k, b, data| -> Result<(), Error> {
                    let node = data.and_then(|d| w.check_leaf(b, d, 8)).map_err(|e| {
                        let ctx = match leaf_owner[b as usize] {
                            o if (o as usize) < devs.len() => {
                                format!("mapping tree of device {}", devs[o as usize].id)
                            }
                            _ => "mapping leaf shared by several devices".to_string(),
                        };
                        Error::metadata(ctx, e)
                    })?;
                    let n = node.nr_entries();
                    batch
                        .leaves
                        .push((k, n as u8, node.last_key().unwrap_or(0)));
                    batch
                        .blocks
                        .extend((0..n).map(|i| BlockTime::unpack(node.value::<u64>(i)).block));
                    if batch.leaves.len() >= LEAF_BATCH {
                        let mut next = back_rx.try_recv().unwrap_or_default();
                        next.leaves.clear();
                        next.blocks.clear();
                        // The counter stops receiving only when this thread is done.
                        let _ = tx.send(std::mem::replace(&mut batch, next));
                    }
                    Ok(())
                })?;
                let _ = tx.send(batch);
                Ok(())
            })
            .map_err(Error::Thread)?;
        for batch in rx.iter() {
            let mut at = 0usize;
            for &(k, n, last) in &batch.leaves {
                summary_nr[k] = n;
                summary_last[k] = last;
                let by = match leaf_owner[leaves_ref[k] as usize] {
                    o if (o as usize) < devs.len() => Some(o as usize),
                    _ => None,
                };
                let end = at + n as usize;
                owners.add_leaf(&batch.blocks[at..end], by, &mut excl_shared);
                at = end;
                done += 1;
                if done % 4096 == 0 {
                    progress(done, total);
                }
            }
            let _ = back_tx.send(batch);
        }
        drop(back_tx);
        reader
            .join()
            .unwrap_or_else(|_| Err(Error::Inconsistent("the leaf reader failed".into())))
    })?;
    progress(total, total);

    for (i, t) in trees.iter().enumerate() {
        let row = &mut rows[i];
        row.shared = excl_shared[i];
        for &l in walker.leaves(t) {
            // A leaf that was not fresh here was first reached by another
            // tree (the device details or the top level): damage.
            let Ok(k) = leaves.binary_search(&l) else {
                return Err(Error::Inconsistent(format!(
                    "block {l} is both a mapping leaf of device {} and a node of another tree",
                    devs[i].id
                )));
            };
            let (nr, last) = (summary_nr[k], summary_last[k]);
            row.mapped += nr as u64;
            if leaf_owner[l as usize] == SHARED_LEAF {
                row.shared += nr as u64;
            }
            if nr > 0 {
                row.highest = row.highest.max(last);
            }
        }
    }
    Ok(())
}

/// Who referenced each data block so far, in `S`-sized slots: 0 nobody;
/// `1..=n` once, by a leaf only device `slot - 1` reaches; `n + 1` once, by
/// a shared leaf; `n + 2` more than once.
struct Slots<S> {
    slots: Vec<S>,
    once_by_shared: u32,
    many: u32,
}

trait Slot: Copy + Default {
    fn load(self) -> u32;
    fn store(v: u32) -> Self;
}

macro_rules! slot {
    ($t:ty) => {
        impl Slot for $t {
            #[inline(always)]
            fn load(self) -> u32 {
                self as u32
            }
            #[inline(always)]
            fn store(v: u32) -> Self {
                v as $t
            }
        }
    };
}
slot!(u8);
slot!(u16);
slot!(u32);

impl<S: Slot> Slots<S> {
    fn new(nr_devices: usize, nr_data_blocks: u64) -> Self {
        Slots {
            slots: vec![S::default(); nr_data_blocks as usize],
            once_by_shared: nr_devices as u32 + 1,
            many: nr_devices as u32 + 2,
        }
    }

    #[inline(always)]
    fn prefetch(&self, b: u64) {
        #[cfg(target_arch = "x86_64")]
        if let Some(s) = self.slots.get(b as usize) {
            // SAFETY: prefetching is a hint; the address is in bounds anyway.
            unsafe {
                std::arch::x86_64::_mm_prefetch(
                    (s as *const S).cast::<i8>(),
                    std::arch::x86_64::_MM_HINT_T0,
                )
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = b;
    }

    /// Count the references of one leaf: `by` is the only device that
    /// reaches it, None when it is shared (its mappings are all shared
    /// anyway). A reference that makes a block referenced twice charges
    /// the first referencing device too.
    #[inline]
    fn add_leaf(&mut self, blocks: &[u64], by: Option<usize>, excl_shared: &mut [u64]) {
        for &b in blocks {
            self.prefetch(b);
        }
        for &b in blocks {
            // Blocks beyond the data device are never counted (as the peer).
            let Some(slot) = self.slots.get_mut(b as usize) else {
                continue;
            };
            let s = slot.load();
            if s == 0 {
                *slot = S::store(match by {
                    Some(d) => d as u32 + 1,
                    None => self.once_by_shared,
                });
                continue;
            }
            if s != self.many {
                if s < self.once_by_shared {
                    excl_shared[s as usize - 1] += 1;
                }
                *slot = S::store(self.many);
            }
            if let Some(d) = by {
                excl_shared[d] += 1;
            }
        }
    }
}

/// [`Slots`] as narrow as the number of devices allows.
enum DataOwners {
    U8(Slots<u8>),
    U16(Slots<u16>),
    U32(Slots<u32>),
}

impl DataOwners {
    fn new(nr_devices: usize, nr_data_blocks: u64) -> Self {
        let need = nr_devices as u64 + 2;
        if need <= u8::MAX as u64 {
            DataOwners::U8(Slots::new(nr_devices, nr_data_blocks))
        } else if need <= u16::MAX as u64 {
            DataOwners::U16(Slots::new(nr_devices, nr_data_blocks))
        } else {
            DataOwners::U32(Slots::new(nr_devices, nr_data_blocks))
        }
    }

    fn add_leaf(&mut self, blocks: &[u64], by: Option<usize>, excl_shared: &mut [u64]) {
        match self {
            DataOwners::U8(s) => s.add_leaf(blocks, by, excl_shared),
            DataOwners::U16(s) => s.add_leaf(blocks, by, excl_shared),
            DataOwners::U32(s) => s.add_leaf(blocks, by, excl_shared),
        }
    }
}

//------------------------------------------------------------------------------
// Output

/// A size in bytes as the peer prints it: a binary unit chosen so that the
/// number is at most 8192 (the number cut down by shifting, rounded only
/// when it moves up a unit). The tebibyte suffix is the peer's "Tib".
pub fn pretty_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["b", "KiB", "MiB", "GiB", "Tib", "PiB", "EiB"];
    let mut i = if bytes == 0 {
        0
    } else {
        ((63 - bytes.leading_zeros()) / 10).saturating_sub(1)
    };
    let mut n = bytes >> (10 * i);
    if n > 8192 {
        n = (n as f64 / 1024.0).round() as u64;
        i += 1;
    }
    format!("{n}{}", UNITS[i as usize])
}

/// The text of one cell. Arithmetic wraps as the peer's does.
pub fn cell(field: Field, d: &DeviceUsage, data_block_size: u32) -> String {
    let bs = data_block_size as u64;
    let sectors = |blocks: u64| blocks.wrapping_mul(bs);
    let bytes = |blocks: u64| sectors(blocks) << 9;
    let top = d.highest.wrapping_add(1);
    match field {
        Field::Dev => d.dev_id.to_string(),
        Field::MappedBlocks => d.mapped.to_string(),
        Field::ExclusiveBlocks => d.exclusive().to_string(),
        Field::SharedBlocks => d.shared.to_string(),
        Field::HighestBlock => d.highest.to_string(),
        Field::MappedSectors => sectors(d.mapped).to_string(),
        Field::ExclusiveSectors => sectors(d.exclusive()).to_string(),
        Field::SharedSectors => sectors(d.shared).to_string(),
        Field::HighestSector => sectors(top).wrapping_sub(1).to_string(),
        Field::MappedBytes => bytes(d.mapped).to_string(),
        Field::ExclusiveBytes => bytes(d.exclusive()).to_string(),
        Field::SharedBytes => bytes(d.shared).to_string(),
        Field::HighestByte => bytes(top).wrapping_sub(1).to_string(),
        Field::Mapped => pretty_size(bytes(d.mapped)),
        Field::Exclusive => pretty_size(bytes(d.exclusive())),
        Field::Shared => pretty_size(bytes(d.shared)),
        Field::HighestMapped => pretty_size(bytes(top).wrapping_sub(1)),
        Field::Transaction => d.details.transaction_id.to_string(),
        Field::CreateTime => d.details.creation_time.to_string(),
        Field::SnapTime => d.details.snapshotted_time.to_string(),
    }
}

/// Write the table: every cell right-aligned to its column's widest cell
/// (the header included) and followed by one space; a newline ends each row.
pub fn render(
    out: &mut dyn Write,
    fields: &[Field],
    headers: bool,
    listing: &Listing,
) -> io::Result<()> {
    if fields.is_empty() {
        return Ok(());
    }
    let mut rows: Vec<Vec<String>> = Vec::with_capacity(listing.devices.len() + 1);
    if headers {
        rows.push(fields.iter().map(|f| f.name().to_string()).collect());
    }
    for d in &listing.devices {
        rows.push(
            fields
                .iter()
                .map(|&f| cell(f, d, listing.data_block_size))
                .collect(),
        );
    }
    let mut widths = vec![0usize; fields.len()];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut line = String::new();
    for r in &rows {
        line.clear();
        for (c, &w) in r.iter().zip(&widths) {
            line.extend(std::iter::repeat(' ').take(w - c.len()));
            line.push_str(c);
            line.push(' ');
        }
        line.push('\n');
        out.write_all(line.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretty_sizes_follow_the_peer() {
        assert_eq!(pretty_size(0), "0b");
        assert_eq!(pretty_size(1), "1b");
        assert_eq!(pretty_size(8192), "8192b");
        assert_eq!(pretty_size(8193), "8KiB");
        assert_eq!(pretty_size(8 * 1024 + 512), "9KiB");
        assert_eq!(pretty_size(1023 * 1024 + 512), "1024KiB");
        assert_eq!(pretty_size(8 << 20), "8192KiB");
        assert_eq!(pretty_size((8 << 20) + 1024), "8MiB");
        assert_eq!(pretty_size(8 << 40), "8192GiB");
        assert_eq!(pretty_size((8 << 40) + (1 << 30)), "8Tib");
        assert_eq!(pretty_size(u64::MAX), "16EiB");
    }

    #[test]
    fn field_names_round_trip() {
        for (n, f) in ALL_FIELDS {
            assert_eq!(Field::parse(n), Some(*f));
            assert_eq!(f.name(), *n);
        }
        assert_eq!(Field::parse("dev"), None);
    }

    #[test]
    fn table_is_right_aligned_with_a_space_after_each_cell() {
        let listing = Listing {
            data_block_size: 128,
            devices: vec![DeviceUsage {
                dev_id: 1000,
                details: DeviceDetails::default(),
                mapped: 3,
                shared: 1,
                highest: 9,
            }],
        };
        let mut out = Vec::new();
        render(
            &mut out,
            &[Field::Dev, Field::ExclusiveBlocks, Field::Mapped],
            true,
            &listing,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            " DEV EXCLUSIVE_BLOCKS MAPPED \n1000                2 192KiB \n"
        );
    }
}
