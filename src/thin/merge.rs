//! thin_merge: merging a thin device into what it was taken from.
//!
//! # Into an external origin (data copy)
//!
//! A thin device with an external origin (`thin POOL ID ORIGIN`) reads every
//! block it has not provisioned from the origin, and the kernel zero-fills
//! reads past the origin's end (`schedule_external_copy`, FORMATS.md §7). So
//! the device's content is the origin with each mapped virtual block `v`
//! replaced by its data block `d`, and merging it into the origin is: for
//! every mapping, copy bytes `[d*B, (d+1)*B)` of the pool's data device to
//! `[v*B, (v+1)*B)` of the origin (B = the pool's data block size), clipped
//! at the origin's end. Mapped blocks wholly past the end cannot be stored
//! in the origin and are not copied (they are counted and reported).
//!
//! Mappings consecutive in both virtual and data blocks form an [`Extent`],
//! read in one request; extents consecutive in virtual blocks are gathered
//! into one write of up to [`IO_BYTES`].
//!
//! Idempotence: a merge writes, at each origin offset it touches, bytes read
//! from the data device as the metadata maps them, and nothing else; it
//! never reads the origin, never writes the metadata or the data device, and
//! which offsets it writes depends on the metadata and the origin's size
//! only. A merge that stops anywhere (crash, signal, I/O error) leaves each
//! written range either old or new, and running it again writes the same
//! bytes to the same ranges, so the result is the same as one uninterrupted
//! run.
//!
//! `--delta-from OLD`: when the origin already holds device OLD's content
//! (OLD was merged, or the origin was copied from it), only the blocks
//! where the two devices differ need copying. The sharing-aware diff of
//! [`crate::thin::delta`] gives them without reading the subtrees both
//! devices share: blocks mapped by NEW to another data block than OLD's, or
//! mapped only by NEW. Blocks both map to the same data block already hold
//! the right bytes; blocks only OLD maps are read by NEW from the origin, so
//! they are left as they are ([`DeltaCounts::first_left_only`]: NEW read the
//! origin's earlier bytes there before OLD was merged, which no merge of NEW
//! brings back). The result is the same as a full merge of NEW into that
//! origin.
//!
//! # Into a thin origin (metadata only)
//!
//! [`merge_into_thin`] is what `lvconvert --merge` achieves for a thin
//! snapshot, done offline in one transaction: the origin id takes the
//! snapshot's mapping tree (moved, not copied: the snapshot's reference to
//! its root becomes the origin's) and its mapped_blocks, the snapshot id
//! disappears, and the origin's old tree loses its reference, which frees
//! what nothing else (another snapshot, the metadata snapshot) holds, data
//! blocks included, as the kernel's `dm_btree_del` would.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use crate::pdata::btree::{insert, lookup, remove, remove_keep_value, Value, Walker};
use crate::pdata::io::BlockDevice;
use crate::pdata::txn::{Transaction, ValueRefs};
use crate::pdata::{self, le64};
use crate::thin::delta::{
    delta_exact, DeltaError, DeltaHeader, DeltaOptions, DeltaVisitor, Kind, Run, Target,
};
use crate::thin::device::{BlockTime, DeviceDetails};
use crate::thin::dump::select_superblock;
use crate::thin::metadata::{Devices, ThinDevice};
use crate::thin::superblock::{read_superblock, Superblock, SUPERBLOCK_LOCATION};
use crate::thin::Error;

/// The largest read or write of the data copy.
pub const IO_BYTES: usize = 8 << 20;

/// `len` consecutive virtual blocks from `vblock`, mapped to consecutive
/// data blocks from `data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub vblock: u64,
    pub data: u64,
    pub len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// The request does not fit the pool (a missing device, the same id
    /// twice, ...): nothing was written.
    #[error("{0}")]
    Refused(String),
    #[error("the metadata has needs_check set: run thin_check (and thin_repair) first")]
    NeedsCheck,
    /// The metadata is damaged: changing it in place could make it worse.
    #[error("{0}")]
    Unsound(String),
    /// The metadata is damaged or inconsistent (or unreadable).
    #[error(transparent)]
    Thin(#[from] Error),
    /// Inside the metadata transaction.
    #[error(transparent)]
    Metadata(#[from] pdata::Error),
    /// Reading the data device or origin, writing the origin or output.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    /// The test hook stopped the copy.
    #[error("stopped before write {0} (test hook: an interrupted merge)")]
    Interrupted(u64),
}

impl MergeError {
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        MergeError::Io {
            what: what.into(),
            source,
        }
    }
}

impl From<DeltaError> for MergeError {
    fn from(e: DeltaError) -> Self {
        match e {
            DeltaError::Thin(e) => MergeError::Thin(e),
            e @ DeltaError::MissingDevices { .. } => MergeError::Refused(e.to_string()),
        }
    }
}

//------------------------------------------------------------------------------
// Reading a device's mappings

/// Device `id` as the superblock `sb` sees it: its details and mapping root.
/// A device that is in neither tree is refused; one in only one of them is
/// inconsistent metadata.
pub fn find_device(
    meta: &BlockDevice,
    sb: &Superblock,
    id: u64,
    in_snapshot: bool,
) -> Result<ThinDevice, MergeError> {
    let mut walker = Walker::new(meta);
    let devices = Devices::read(&mut walker, sb, false);
    if let Some((tree, e)) = devices.first_fatal() {
        return Err(Error::metadata(tree, e.clone()).into());
    }
    let roots = devices.roots.as_ref().expect("mapping tree read");
    match (devices.details.get(&id), roots.get(&id)) {
        (Some(&details), Some(&root)) => Ok(ThinDevice { id, details, root }),
        (None, None) => Err(MergeError::Refused(missing(
            id,
            devices.details.keys().copied(),
            in_snapshot,
        ))),
        (Some(_), None) => Err(Error::Inconsistent(format!(
            "device {id} is in the device details tree but has no mapping tree"
        ))
        .into()),
        (None, Some(_)) => Err(Error::Inconsistent(format!(
            "device {id} has a mapping tree but no entry in the device details tree"
        ))
        .into()),
    }
}

/// "thin device ID is not in the pool (its devices: ...)".
fn missing(id: u64, present: impl Iterator<Item = u64>, in_snapshot: bool) -> String {
    let ids: Vec<String> = present.map(|i| i.to_string()).collect();
    let place = if in_snapshot {
        "the metadata snapshot"
    } else {
        "the pool"
    };
    if ids.is_empty() {
        return format!("thin device {id} is not in {place}, which has no thin devices");
    }
    const SHOWN: usize = 16;
    let more = if ids.len() > SHOWN { ", ..." } else { "" };
    format!(
        "thin device {id} is not in {place} (its devices: {}{more})",
        ids[..ids.len().min(SHOWN)].join(", ")
    )
}

/// Every mapping of the tree at `root` (device `id`, for messages), in
/// virtual-block order, as maximal extents.
pub fn device_extents(
    meta: &BlockDevice,
    root: u64,
    id: u64,
    f: &mut dyn FnMut(Extent) -> Result<(), MergeError>,
) -> Result<(), MergeError> {
    let context = || format!("mapping tree of device {id}");
    let mut walker = Walker::new(meta);
    let tree = walker.walk(root, 8);
    if let Some(issue) = walker.issues.iter().find(|i| i.fatal) {
        return Err(Error::metadata(context(), issue.error.clone()).into());
    }
    let leaves = walker.leaves(&tree).to_vec();
    let mut cur: Option<Extent> = None;
    meta.read_in_order(&leaves, 256, |_, b, data| -> Result<(), MergeError> {
        let node = data
            .and_then(|d| walker.check_leaf(b, d, 8))
            .map_err(|e| Error::metadata(context(), e))?;
        for i in 0..node.nr_entries() {
            let v = node.key(i);
            let d = BlockTime::unpack(node.value::<u64>(i)).block;
            if let Some(c) = &mut cur {
                if v == c.vblock.saturating_add(c.len) && d == c.data.saturating_add(c.len) {
                    c.len += 1;
                    continue;
                }
                if v < c.vblock.saturating_add(c.len) {
                    return Err(Error::metadata(
                        context(),
                        pdata::Error::invalid(b, format!("key {v} is out of order")),
                    )
                    .into());
                }
            }
            if let Some(c) = cur.replace(Extent {
                vblock: v,
                data: d,
                len: 1,
            }) {
                f(c)?;
            }
        }
        Ok(())
    })?;
    if let Some(c) = cur {
        f(c)?;
    }
    Ok(())
}

/// What a delta merge leaves out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeltaCounts {
    /// Blocks both devices map to the same data block (in the leaves
    /// compared; shared subtrees are skipped unread and not counted).
    pub same_blocks: u64,
    /// Blocks only the older device maps: the newer one reads them from the origin.
    pub left_only_blocks: u64,
    /// The first of them (virtual block).
    pub first_left_only: Option<u64>,
    /// Subtrees both devices share, never read.
    pub shared_subtrees: u64,
    /// Mapping-tree nodes read by the diff.
    pub nodes_read: u64,
}

/// The extents device `new` maps differently from device `old` (or that
/// only `new` maps), in virtual-block order, from the sharing-aware diff.
pub fn delta_extents(
    meta: &BlockDevice,
    metadata_snap: Option<Option<u64>>,
    old: u64,
    new: u64,
    f: &mut dyn FnMut(Extent) -> Result<(), MergeError>,
) -> Result<DeltaCounts, MergeError> {
    struct V<'f> {
        f: &'f mut dyn FnMut(Extent) -> Result<(), MergeError>,
        counts: DeltaCounts,
        /// The sink's error, carried through the visitor's io::Result.
        failed: Option<MergeError>,
    }
    impl DeltaVisitor for V<'_> {
        fn begin(&mut self, _: &DeltaHeader) -> io::Result<()> {
            Ok(())
        }
        fn run(&mut self, r: &Run) -> io::Result<()> {
            let data = match r.kind {
                Kind::Same => {
                    self.counts.same_blocks += r.len;
                    return Ok(());
                }
                Kind::LeftOnly => {
                    self.counts.left_only_blocks += r.len;
                    self.counts.first_left_only.get_or_insert(r.begin);
                    return Ok(());
                }
                Kind::Different => r.right_data,
                Kind::RightOnly => r.data,
            };
            let e = Extent {
                vblock: r.begin,
                data,
                len: r.len,
            };
            (self.f)(e).map_err(|e| {
                self.failed = Some(e);
                io::Error::other("stopped")
            })
        }
        fn end(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut v = V {
        f,
        counts: DeltaCounts::default(),
        failed: None,
    };
    let opts = DeltaOptions {
        metadata_snap,
        left: Target::Device(old),
        right: Target::Device(new),
        changes_only: true,
    };
    let r = delta_exact(meta, &opts, &mut v);
    if let Some(e) = v.failed.take() {
        return Err(e);
    }
    let stats = r?;
    v.counts.shared_subtrees = stats.shared_subtrees;
    v.counts.nodes_read = stats.nodes_read;
    Ok(v.counts)
}

//------------------------------------------------------------------------------
// The copy

/// Where gathered bytes go: `sink(destination offset, bytes)`.
pub type Sink<'s> = dyn FnMut(u64, &[u8]) -> Result<(), MergeError> + 's;

/// Gathers byte ranges read from a source into writes of consecutive
/// destination bytes, up to the buffer's size.
pub struct Gather {
    buf: Vec<u8>,
    len: usize,
    /// Destination offset of `buf[0]`.
    dst: u64,
}

impl Gather {
    pub fn new(io_bytes: usize) -> Gather {
        Gather {
            buf: vec![0u8; io_bytes.max(4096)],
            len: 0,
            dst: 0,
        }
    }

    /// Copy `len` bytes at `src_off` of `src` (named `src_name` in
    /// messages) to destination offset `dst`, through `sink(offset, bytes)`.
    pub fn add(
        &mut self,
        src: &File,
        src_name: &str,
        src_off: u64,
        dst: u64,
        len: u64,
        sink: &mut Sink,
    ) -> Result<(), MergeError> {
        self.add_with(dst, len, sink, |buf, done| {
            let at = src_off + done;
            src.read_exact_at(buf, at).map_err(|e| {
                let e = if e.kind() == io::ErrorKind::UnexpectedEof {
                    io::Error::new(e.kind(), "ends before the bytes the mappings need")
                } else {
                    e
                };
                MergeError::io(
                    format!("{src_name}: reading {} bytes at offset {at}", buf.len()),
                    e,
                )
            })
        })
    }

    /// `len` zero bytes at destination offset `dst`.
    pub fn add_zeros(&mut self, dst: u64, len: u64, sink: &mut Sink) -> Result<(), MergeError> {
        self.add_with(dst, len, sink, |buf, _| {
            buf.fill(0);
            Ok(())
        })
    }

    /// `len` bytes at destination `dst`, each piece of the buffer filled by
    /// `fill(piece, bytes done before it)`.
    fn add_with(
        &mut self,
        mut dst: u64,
        len: u64,
        sink: &mut Sink,
        mut fill: impl FnMut(&mut [u8], u64) -> Result<(), MergeError>,
    ) -> Result<(), MergeError> {
        if self.len > 0 && self.dst + self.len as u64 != dst {
            self.flush(sink)?;
        }
        let mut done = 0u64;
        while done < len {
            if self.len == 0 {
                self.dst = dst;
            }
            let n = (self.buf.len() - self.len).min((len - done).min(usize::MAX as u64) as usize);
            fill(&mut self.buf[self.len..self.len + n], done)?;
            self.len += n;
            dst += n as u64;
            done += n as u64;
            if self.len == self.buf.len() {
                self.flush(sink)?;
            }
        }
        Ok(())
    }

    pub fn flush(&mut self, sink: &mut Sink) -> Result<(), MergeError> {
        if self.len > 0 {
            let n = self.len;
            self.len = 0;
            sink(self.dst, &self.buf[..n])?;
        }
        Ok(())
    }
}

/// What a merge into an external origin copies (or would copy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Stretches of consecutive virtual blocks copied.
    pub runs: u64,
    /// Mapped blocks copied (the last one possibly clipped at the origin's end).
    pub blocks: u64,
    pub bytes: u64,
    /// Writes issued to the origin.
    pub writes: u64,
    /// Mapped blocks wholly past the origin's end: not copied.
    pub beyond_blocks: u64,
    /// The first of them (virtual block).
    pub first_beyond: Option<u64>,
    /// One past the highest mapped virtual block (all mappings).
    pub end_block: u64,
}

/// Where the data of a merge comes from and goes to.
pub struct CopyTarget<'a> {
    pub data: &'a File,
    pub data_name: &'a str,
    pub origin: &'a File,
    pub origin_name: &'a str,
    pub origin_size: u64,
}

/// Options of a merge into an external origin.
#[derive(Debug, Clone, Default)]
pub struct ExternalMerge {
    /// None: live metadata. Some(None): the held metadata snapshot.
    /// Some(Some(b)): the snapshot superblock at b.
    pub metadata_snap: Option<Option<u64>>,
    pub dev_id: u64,
    /// Copy only what differs from this device (already in the origin).
    pub delta_from: Option<u64>,
    /// Test hook: stop (with [`MergeError::Interrupted`]) before write k+1.
    pub fail_after_writes: Option<u64>,
}

/// The pool as a merge needs it.
#[derive(Debug, Clone, Copy)]
pub struct PoolInfo {
    /// Data block size in bytes.
    pub block_bytes: u64,
    /// Data blocks of the pool (from the live superblock: a metadata
    /// snapshot's copy has no space maps).
    pub nr_data_blocks: u64,
    /// The device merged.
    pub device: ThinDevice,
}

/// Read the superblock(s) and find the devices of a merge; refuse
/// needs_check and missing devices.
pub fn pool_info(meta: &BlockDevice, m: &ExternalMerge) -> Result<PoolInfo, MergeError> {
    let live =
        read_superblock(meta, SUPERBLOCK_LOCATION).map_err(|e| Error::metadata("superblock", e))?;
    if live.needs_check() {
        return Err(MergeError::NeedsCheck);
    }
    let sb = select_superblock(meta, m.metadata_snap)?;
    let in_snap = m.metadata_snap.is_some();
    let device = find_device(meta, &sb, m.dev_id, in_snap)?;
    if let Some(old) = m.delta_from {
        if old == m.dev_id {
            return Err(MergeError::Refused(format!(
                "--delta-from {old} is the device merged: nothing would differ"
            )));
        }
        find_device(meta, &sb, old, in_snap)?;
    }
    Ok(PoolInfo {
        block_bytes: sb.data_block_size as u64 * 512,
        nr_data_blocks: live.data_sm().nr_blocks,
        device,
    })
}

/// The extents a merge copies (before clipping), in virtual-block order.
fn extents(
    meta: &BlockDevice,
    m: &ExternalMerge,
    pool: &PoolInfo,
    f: &mut dyn FnMut(Extent) -> Result<(), MergeError>,
) -> Result<Option<DeltaCounts>, MergeError> {
    let nr = pool.nr_data_blocks;
    let id = pool.device.id;
    let mut checked = |e: Extent| {
        if e.data.checked_add(e.len).map_or(true, |end| end > nr) {
            return Err(MergeError::Thin(Error::Inconsistent(format!(
                "device {id} maps virtual block {} to data block {}, beyond the pool's {nr} data blocks",
                e.vblock, e.data
            ))));
        }
        f(e)
    };
    match m.delta_from {
        None => {
            device_extents(meta, pool.device.root, id, &mut checked)?;
            Ok(None)
        }
        Some(old) => Ok(Some(delta_extents(
            meta,
            m.metadata_snap,
            old,
            id,
            &mut checked,
        )?)),
    }
}

/// Walk the extents of a merge clipped at `clip` bytes, counting them and
/// handing each copied piece (virtual byte offset, data byte offset, length)
/// to `copy`.
fn clipped(
    meta: &BlockDevice,
    m: &ExternalMerge,
    pool: &PoolInfo,
    clip: u64,
    stats: &mut CopyStats,
    copy: &mut dyn FnMut(u64, u64, u64) -> Result<(), MergeError>,
) -> Result<Option<DeltaCounts>, MergeError> {
    let bb = pool.block_bytes;
    let mut run_end: Option<u64> = None;
    extents(meta, m, pool, &mut |e| {
        stats.end_block = stats.end_block.max(e.vblock.saturating_add(e.len));
        let start = e.vblock.saturating_mul(bb);
        if start >= clip {
            stats.beyond_blocks += e.len;
            stats.first_beyond.get_or_insert(e.vblock);
            return Ok(());
        }
        let end = (e.vblock.saturating_add(e.len))
            .saturating_mul(bb)
            .min(clip);
        let inside = (end - start).div_ceil(bb);
        stats.blocks += inside;
        if inside < e.len {
            stats.beyond_blocks += e.len - inside;
            stats
                .first_beyond
                .get_or_insert(e.vblock.saturating_add(inside));
        }
        stats.bytes += end - start;
        if run_end != Some(start) {
            stats.runs += 1;
        }
        run_end = Some(end);
        copy(start, e.data * bb, end - start)
    })
}

/// What a merge would copy: counts only, nothing read but the metadata.
pub fn plan_external(
    meta: &BlockDevice,
    m: &ExternalMerge,
    pool: &PoolInfo,
    origin_size: u64,
) -> Result<(CopyStats, Option<DeltaCounts>), MergeError> {
    let mut stats = CopyStats::default();
    let delta = clipped(
        meta,
        m,
        pool,
        origin_size,
        &mut stats,
        &mut |_, _, _| Ok(()),
    )?;
    Ok((stats, delta))
}

/// Merge device `m.dev_id` into the external origin: copy its mapped blocks
/// (or, with `delta_from`, those that differ) from the data device to the
/// origin, clipped at the origin's end, then flush the origin. `progress`
/// gets (bytes written, `total_bytes`).
pub fn merge_external(
    meta: &BlockDevice,
    m: &ExternalMerge,
    pool: &PoolInfo,
    t: &CopyTarget,
    total_bytes: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(CopyStats, Option<DeltaCounts>), MergeError> {
    let mut stats = CopyStats::default();
    let mut gather = Gather::new(IO_BYTES);
    let mut writes = 0u64;
    let mut done = 0u64;
    let fail_after = m.fail_after_writes;
    progress(0, total_bytes);
    let mut sink = |off: u64, bytes: &[u8]| -> Result<(), MergeError> {
        if fail_after == Some(writes) {
            return Err(MergeError::Interrupted(writes + 1));
        }
        crate::pdata::io::write_at(t.origin, bytes, off).map_err(|e| {
            MergeError::io(
                format!(
                    "{}: writing {} bytes at offset {off}",
                    t.origin_name,
                    bytes.len()
                ),
                e,
            )
        })?;
        writes += 1;
        done += bytes.len() as u64;
        progress(done, total_bytes);
        Ok(())
    };
    let delta = clipped(
        meta,
        m,
        pool,
        t.origin_size,
        &mut stats,
        &mut |dst, src, len| gather.add(t.data, t.data_name, src, dst, len, &mut sink),
    )?;
    gather.flush(&mut sink)?;
    stats.writes = writes;
    crate::pdata::io::sync_all(t.origin)
        .map_err(|e| MergeError::io(format!("{}: flushing", t.origin_name), e))?;
    Ok((stats, delta))
}

//------------------------------------------------------------------------------
// Metadata-level merge of a thin snapshot into its thin origin

/// What [`merge_into_thin`] did (or, dry run, would do).
#[derive(Debug, Clone)]
pub struct ThinMerge {
    /// The superblock committed (or that would be).
    pub superblock: Superblock,
    /// The origin's details before and after.
    pub origin_before: DeviceDetails,
    pub origin_after: DeviceDetails,
    /// Blocks whose last reference went (the origin's old tree and what
    /// only it held).
    pub data_blocks_freed: u64,
    pub metadata_blocks_freed: u64,
}

/// Merge thin snapshot `snap` into thin device `origin` on the inactive
/// metadata `meta` (opened read-write and exclusive), in one transaction:
/// `origin` takes `snap`'s mapping tree and mapped_blocks, `snap` is
/// removed, and `origin`'s old tree is released. `dry_run`: everything but
/// the commit.
///
/// The origin keeps its id, creation time and everything that names it;
/// its transaction id becomes the pool's current one (the kernel's rule for
/// a changed device), and its snapshotted time the later of the two (the
/// kernel treats a block as shared when it was written before the device's
/// snapshotted time: the snapshot's tree holds blocks it shares with
/// whatever was snapshotted from either device).
pub fn merge_into_thin(
    meta: &BlockDevice,
    snap: u64,
    origin: u64,
    dry_run: bool,
) -> Result<ThinMerge, MergeError> {
    if snap == origin {
        return Err(MergeError::Refused(format!(
            "the snapshot and the origin are the same device ({snap})"
        )));
    }
    let sb = read_superblock(meta, SUPERBLOCK_LOCATION)?;
    if sb.needs_check() {
        return Err(MergeError::NeedsCheck);
    }
    crate::thin::check::require_sound(meta).map_err(MergeError::Unsound)?;
    let mut txn = Transaction::begin(meta, sb.data_sm(), sb.metadata_sm())?;
    let mut new = sb.clone();
    let details = |txn: &Transaction, id: u64| -> Result<Option<DeviceDetails>, MergeError> {
        Ok(crate::thin::device::lookup_details(
            txn,
            sb.details_root,
            id,
        )?)
    };
    let present = || -> Vec<u64> {
        crate::pdata::btree::entries(&txn, sb.details_root, DeviceDetails::SIZE)
            .map(|e| e.into_iter().map(|(k, _)| k).collect())
            .unwrap_or_default()
    };
    let (sd, od) = (details(&txn, snap)?, details(&txn, origin)?);
    let (Some(sd), Some(od)) = (sd, od) else {
        let ids = present();
        let miss = if sd.is_none() { snap } else { origin };
        let what = if miss == snap {
            "--dev-id"
        } else {
            "--into-thin"
        };
        return Err(MergeError::Refused(format!(
            "{what}: {}",
            missing(miss, ids.into_iter(), false)
        )));
    };
    for id in [snap, origin] {
        if lookup(&txn, sb.mapping_root, id, 8)?.is_none() {
            return Err(Error::Inconsistent(format!(
                "device {id} is in the device details tree but has no mapping tree"
            ))
            .into());
        }
    }
    let nr_data = sb.data_sm().nr_blocks;
    let nr_meta = sb.metadata_sm().nr_blocks.min(meta.nr_blocks());
    let used = |txn: &Transaction| -> (u64, u64) {
        let d = (0..nr_data).filter(|&b| txn.data_count(b) > 0).count() as u64;
        let m = (0..nr_meta).filter(|&b| txn.meta_count(b) > 0).count() as u64;
        (d, m)
    };
    let (d0, m0) = used(&txn);

    // The snapshot leaves the top level; its reference to its tree is now ours.
    let (root, value) =
        remove_keep_value(&mut txn, new.mapping_root, snap, ValueRefs::MetadataRoot)?;
    new.mapping_root = root;
    let tree = le64(&value.expect("looked up above"), 0);
    // ... and moves to the origin, whose old tree is released (deleted as
    // far as nothing else holds it).
    new.mapping_root = insert(
        &mut txn,
        new.mapping_root,
        origin,
        &tree.to_le_bytes(),
        ValueRefs::MetadataRoot,
    )?
    .0;
    new.details_root = remove(&mut txn, new.details_root, snap, ValueRefs::Nothing)?.0;
    let after = DeviceDetails {
        mapped_blocks: sd.mapped_blocks,
        transaction_id: sb.transaction_id,
        creation_time: od.creation_time,
        snapshotted_time: od.snapshotted_time.max(sd.snapshotted_time),
    };
    new.details_root = insert(
        &mut txn,
        new.details_root,
        origin,
        &after.encode(),
        ValueRefs::Nothing,
    )?
    .0;
    let (d1, m1) = used(&txn);
    let mut result = ThinMerge {
        superblock: new.clone(),
        origin_before: od,
        origin_after: after,
        data_blocks_freed: d0.saturating_sub(d1),
        // New nodes (shadows) are counted too: this is the net change.
        metadata_blocks_freed: m0.saturating_sub(m1),
    };
    if dry_run {
        return Ok(result);
    }
    result.superblock = crate::thin::superblock::commit_transaction(txn, new)?;
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gather_joins_consecutive_destinations_and_splits_at_the_buffer_size() {
        let mut src = tempfile::tempfile().unwrap();
        let bytes: Vec<u8> = (0..32768u32).map(|i| (i % 251) as u8).collect();
        src.write_all(&bytes).unwrap();
        let mut writes: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut sink = |off: u64, b: &[u8]| {
            writes.push((off, b.to_vec()));
            Ok(())
        };
        let mut g = Gather::new(8192);
        g.add(&src, "src", 0, 100, 4096, &mut sink).unwrap();
        g.add(&src, "src", 20000, 4196, 6000, &mut sink).unwrap(); // continues: fills 8192
        g.add(&src, "src", 0, 50000, 10, &mut sink).unwrap(); // elsewhere
        g.flush(&mut sink).unwrap();
        let w: Vec<(u64, usize)> = writes.iter().map(|(o, b)| (*o, b.len())).collect();
        assert_eq!(w, vec![(100, 8192), (8292, 1904), (50000, 10)]);
        assert_eq!(&writes[0].1[..4096], &bytes[..4096]);
        assert_eq!(&writes[0].1[4096..], &bytes[20000..24096]);
        assert_eq!(&writes[1].1[..], &bytes[24096..26000]);
    }

    #[test]
    fn reading_past_the_source_is_an_error() {
        let mut src = tempfile::tempfile().unwrap();
        src.write_all(&[1u8; 100]).unwrap();
        let mut g = Gather::new(4096);
        let mut sink = |_: u64, _: &[u8]| Ok(());
        let e = g.add(&src, "DATA", 50, 0, 100, &mut sink).unwrap_err();
        assert!(e.to_string().contains("DATA"), "{e}");
    }

    #[test]
    fn missing_lists_the_devices() {
        assert_eq!(
            missing(7, [1, 2].into_iter(), false),
            "thin device 7 is not in the pool (its devices: 1, 2)"
        );
        assert!(missing(7, std::iter::empty(), true).contains("metadata snapshot"));
    }
}
