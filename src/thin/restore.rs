//! Building thin metadata from the event stream of a dump.
//!
//! [`PoolBuilder`] is the writing end of the event model: thin_restore feeds
//! it from XML, thin_repair from the trees it recovered, the generator from
//! its model. Trees are bulk-built in one pass; `<def>`s become leaves that
//! every `<ref>` shares (so sharing survives a dump/restore round trip), and
//! data blocks are counted once per distinct leaf, as the kernel counts them.
//!
//! [`restore`] is the crash-safe driver around it for a whole device: a dry
//! run first (validates everything and measures the space needed, touching
//! nothing), then the real build into blocks the old metadata does not use,
//! a flush, and the superblock last.

use std::io;

use fixedbitset::FixedBitSet;

use crate::pdata::btree::{TreeBuilder, Walker};
use crate::pdata::counts::RefCounts;
use crate::pdata::io::BlockDevice;
use crate::pdata::space_map::{
    write_data_sm, write_metadata_sm, DiskSpaceMap, ENTRIES_PER_BITMAP, MAX_METADATA_BLOCKS,
};
use crate::pdata::writer::BlockWriter;
use crate::pdata::{self, BLOCK_SIZE};
use crate::thin::def_name::{DefMap, DefName};
use crate::thin::device::{BlockTime, DeviceDetails};
use crate::thin::dump::{DeviceInfo, Mapping, MetadataVisitor, SuperblockInfo};
use crate::thin::superblock::{
    read_superblock, Superblock, METADATA_BLOCK_SIZE_SECTORS, SUPERBLOCK_LOCATION,
};

/// Values that replace the ones in the input (thin_restore's and thin_repair's overrides).
#[derive(Debug, Clone, Copy, Default)]
pub struct Overrides {
    pub transaction_id: Option<u64>,
    pub data_block_size: Option<u32>,
    pub nr_data_blocks: Option<u64>,
}

/// What a finished build produced.
#[derive(Debug, Clone)]
pub struct BuiltPool {
    pub superblock: Superblock,
    pub nr_devices: u64,
    /// Metadata blocks in use, superblock included.
    pub metadata_blocks_used: u64,
    /// What was corrected on the way (for the user).
    pub notes: Vec<String>,
}

/// A def: its name, its leaves (a range of [`PoolBuilder::def_leaves`]),
/// how many mappings they hold, and whether a device refers to it yet (a
/// def nobody uses would leak its blocks).
struct Def {
    name: DefName,
    leaves: std::ops::Range<usize>,
    entries: u64,
    referenced: bool,
}

fn other(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// Builds a pool's metadata from dump events.
pub struct PoolBuilder<'a, 'd> {
    w: &'a mut BlockWriter<'d>,
    overrides: Overrides,
    sb: Option<SuperblockInfo>,
    data: RefCounts,
    /// The defs in the order they were given, and their numbers by name.
    defs: Vec<Def>,
    def_numbers: DefMap<u32>,
    /// The defs' leaves (first key, block), one def after the other.
    def_leaves: Vec<(u64, u64)>,
    def_entries: u64,
    dev_entries: u64,
    notes: Vec<String>,
    def: Option<(DefName, TreeBuilder)>,
    /// The builder of the last def, for the next one.
    spare_def: Option<TreeBuilder>,
    dev: Option<(DeviceInfo, TreeBuilder)>,
    devices: Vec<(DeviceInfo, u64)>,
    /// The latest time of a mapping or device (the pool's time is raised
    /// to it: a mapping from the future would look unshared to the kernel
    /// after the next snapshot, and be overwritten in place).
    latest_time: u64,
    /// Take a metadata snapshot of the result (the generator's option).
    metadata_snap: bool,
    /// Data counts are given (from a dry run of the same events), not counted.
    data_given: bool,
    /// Set when the pool's data space map alone needs more blocks than the
    /// output has: the blocks it needs.
    too_small: Option<u64>,
}

impl<'a, 'd> PoolBuilder<'a, 'd> {
    pub fn new(w: &'a mut BlockWriter<'d>, overrides: Overrides) -> Self {
        PoolBuilder {
            w,
            overrides,
            sb: None,
            data: RefCounts::new(0),
            defs: Vec::new(),
            def_numbers: DefMap::default(),
            def_leaves: Vec::new(),
            def_entries: 0,
            dev_entries: 0,
            notes: Vec::new(),
            def: None,
            spare_def: None,
            dev: None,
            devices: Vec::new(),
            latest_time: 0,
            metadata_snap: false,
            data_given: false,
            too_small: None,
        }
    }

    /// Use the data reference counts a dry run of the same events made,
    /// instead of counting them again.
    pub fn with_data_counts(mut self, counts: RefCounts) -> Self {
        self.data = counts;
        self.data_given = true;
        self
    }

    /// Also write a metadata snapshot (held root) of the finished pool.
    pub fn with_metadata_snap(mut self, yes: bool) -> Self {
        self.metadata_snap = yes;
        self
    }

    fn nr_data_blocks(&self) -> u64 {
        self.data.nr_blocks()
    }

    fn add_mapping(&mut self, m: &Mapping) -> io::Result<()> {
        let nr = self.nr_data_blocks();
        if m.data_begin >= nr || m.len > nr - m.data_begin {
            return Err(other(format!(
                "data block {} beyond nr_data_blocks {nr}",
                m.data_begin
                    .saturating_add(m.len)
                    .saturating_sub(1)
                    .max(m.data_begin)
            )));
        }
        if self.def.is_some() {
            self.def_entries += m.len;
        } else {
            self.dev_entries += m.len;
        }
        let t = match (&mut self.def, &mut self.dev) {
            (Some((_, t)), _) | (None, Some((_, t))) => t,
            (None, None) => return Err(other("mapping outside a device or def")),
        };
        let (data_begin, time) = (m.data_begin, m.time);
        self.latest_time = self.latest_time.max(time as u64);
        t.push_run(self.w, m.origin_begin, m.len, |i| {
            BlockTime {
                block: data_begin + i,
                time,
            }
            .pack()
        })
        .map_err(other)?;
        if !self.data_given {
            self.data.inc_run(m.data_begin, m.len);
        }
        Ok(())
    }

    /// Splice def `nth`'s leaves into the current device's tree.
    fn reference_def(&mut self, nth: usize) -> io::Result<()> {
        let Some((_, t)) = self.dev.as_mut() else {
            return Err(other("ref outside a device"));
        };
        let def = &mut self.defs[nth];
        self.dev_entries += def.entries;
        def.referenced = true;
        for &(k, b) in &self.def_leaves[def.leaves.clone()] {
            t.push_shared_leaf(self.w, k, b).map_err(other)?;
        }
        Ok(())
    }

    /// Write the device details and mapping trees, both space maps, and
    /// return the superblock to commit (not yet written).
    pub fn finish(mut self) -> pdata::Result<(BuiltPool, RefCounts)> {
        let sbi = self
            .sb
            .take()
            .ok_or_else(|| pdata::Error::Other("no superblock in the input".into()))?;
        for (d, _) in &self.devices {
            self.latest_time = self.latest_time.max(d.creation_time).max(d.snap_time);
        }
        let mut time = sbi.time;
        if self.latest_time > time {
            self.notes.push(format!(
                "the pool's time is {time} but a mapping or device carries time {}; writing {} (a time from the future would let the kernel overwrite shared blocks)",
                self.latest_time, self.latest_time
            ));
            time = self.latest_time;
        }
        let w = &mut *self.w;
        self.devices.sort_by_key(|(d, _)| d.dev_id);
        let mut details = TreeBuilder::new(24);
        let mut top = TreeBuilder::new(8);
        for (d, root) in &self.devices {
            let dd = DeviceDetails {
                mapped_blocks: d.mapped_blocks,
                transaction_id: d.transaction,
                creation_time: d.creation_time as u32,
                snapshotted_time: d.snap_time as u32,
            };
            details.push(w, d.dev_id, &dd.encode())?;
            top.push(w, d.dev_id, &root.to_le_bytes())?;
        }
        let details_root = details.finish(w)?;
        let mapping_root = top.finish(w)?;
        let data_sm = write_data_sm(w, &self.data)?;

        let mut sb = Superblock {
            location: SUPERBLOCK_LOCATION,
            flags: sbi.flags,
            uuid: [0; 16],
            version: sbi.version,
            time: time as u32,
            transaction_id: self.overrides.transaction_id.unwrap_or(sbi.transaction),
            metadata_snap: 0,
            data_sm_root: Superblock::sm_root_bytes(&data_sm),
            metadata_sm_root: [0; 128],
            mapping_root,
            details_root,
            data_block_size: self
                .overrides
                .data_block_size
                .unwrap_or(sbi.data_block_size),
            metadata_block_size: METADATA_BLOCK_SIZE_SECTORS,
            metadata_nr_blocks: w.nr_blocks(),
            compat_flags: 0,
            compat_ro_flags: 0,
            incompat_flags: 0,
        };
        if self.metadata_snap {
            // As the kernel reserves one: a copy of the superblock without
            // space maps, holding one more reference to each of the two roots.
            let b = w.alloc()?;
            w.inc(b);
            w.inc(mapping_root);
            w.inc(details_root);
            let copy = Superblock {
                location: b,
                data_sm_root: [0; 128],
                ..sb.clone()
            };
            w.write(b, &copy.encode())?;
            sb.metadata_snap = b;
        }
        w.inc(SUPERBLOCK_LOCATION);
        let metadata_sm = write_metadata_sm(w)?;
        sb.metadata_sm_root = Superblock::sm_root_bytes(&metadata_sm);
        Ok((
            BuiltPool {
                superblock: sb,
                nr_devices: self.devices.len() as u64,
                metadata_blocks_used: metadata_sm.nr_allocated,
                notes: std::mem::take(&mut self.notes),
            },
            self.data,
        ))
    }
}

impl MetadataVisitor for PoolBuilder<'_, '_> {
    fn superblock_begin(&mut self, sb: &SuperblockInfo) -> io::Result<()> {
        let nr = self.overrides.nr_data_blocks.unwrap_or(sb.nr_data_blocks);
        // Each 16320 data blocks need a bitmap block on the output: a pool
        // whose bitmaps cannot fit is refused before counts are allocated
        // for it (so no count in the input sizes an allocation by itself).
        let bitmaps = nr.div_ceil(ENTRIES_PER_BITMAP);
        if bitmaps >= self.w.nr_blocks() {
            self.too_small = Some(bitmaps + 1);
            return Err(other(format!(
                "nr_data_blocks {nr} needs {bitmaps} space-map bitmap blocks, more than the {}-block output holds",
                self.w.nr_blocks()
            )));
        }
        if !self.data_given {
            self.data = RefCounts::new(nr);
        }
        self.sb = Some(sb.clone());
        Ok(())
    }
    fn superblock_end(&mut self) -> io::Result<()> {
        if let Some(d) = self.defs.iter().find(|d| !d.referenced) {
            return Err(other(format!(
                "def \"{}\" is not referred to by any device (its data blocks would leak)",
                d.name.as_str()
            )));
        }
        Ok(())
    }
    fn def_begin(&mut self, name: &str) -> io::Result<()> {
        if self.def.is_some() || self.dev.is_some() {
            return Err(other("def inside a def or device"));
        }
        self.def_entries = 0;
        let t = self
            .spare_def
            .take()
            .unwrap_or_else(|| TreeBuilder::leaves_only(8));
        self.def = Some((DefName::new(name), t));
        Ok(())
    }
    fn def_end(&mut self) -> io::Result<()> {
        if let Some((name, mut t)) = self.def.take() {
            let start = self.def_leaves.len();
            t.take_leaves(self.w, &mut self.def_leaves).map_err(other)?;
            self.spare_def = Some(t);
            let nth = self.defs.len() as u32;
            if self.def_numbers.insert(name.as_str(), nth).is_err() {
                return Err(other(format!("duplicate def \"{}\"", name.as_str())));
            }
            self.defs.push(Def {
                name,
                leaves: start..self.def_leaves.len(),
                entries: self.def_entries,
                referenced: false,
            });
        }
        Ok(())
    }
    fn device_begin(&mut self, d: &DeviceInfo) -> io::Result<()> {
        self.dev_entries = 0;
        self.dev = Some((*d, TreeBuilder::new(8)));
        Ok(())
    }
    fn device_end(&mut self) -> io::Result<()> {
        if let Some((mut d, t)) = self.dev.take() {
            let root = t.finish(self.w).map_err(other)?;
            if d.mapped_blocks != self.dev_entries {
                // The kernel reports mapped_blocks and thin_check insists
                // it matches the tree: write the true count.
                self.notes.push(format!(
                    "device {}: mapped_blocks=\"{}\" but it has {} mappings; writing {}",
                    d.dev_id, d.mapped_blocks, self.dev_entries, self.dev_entries
                ));
                d.mapped_blocks = self.dev_entries;
            }
            self.devices.push((d, root));
        }
        Ok(())
    }
    fn mapping(&mut self, m: &Mapping) -> io::Result<()> {
        self.add_mapping(m)
    }
    fn reference(&mut self, name: &str) -> io::Result<()> {
        let nth = self
            .def_numbers
            .get(name.as_bytes())
            .ok_or_else(|| other(format!("ref to undefined def \"{name}\"")))?;
        self.reference_def(*nth as usize)
    }
    fn reference_nth(&mut self, name: &str, nth: u32) -> io::Result<()> {
        match self.defs.get(nth as usize) {
            // The number is checked: a wrong one would splice the wrong
            // mappings in.
            Some(d) if d.name.as_bytes() == name.as_bytes() => self.reference_def(nth as usize),
            _ => self.reference(name),
        }
    }
    fn finish(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn upcoming(&mut self, m: &Mapping) {
        if !self.data_given {
            self.data.prefetch(m.data_begin);
        }
    }
}

/// Write `built`'s superblock after everything else is on stable storage:
/// the commit point. A crash before it leaves the old superblock in charge.
pub fn commit(w: &mut BlockWriter, sb: &Superblock) -> pdata::Result<()> {
    w.commit(&sb.encode())
}

/// Metadata blocks a pool on `dev` uses (the kernel ignores any beyond 15.875 GiB).
pub fn metadata_blocks(dev: &BlockDevice) -> u64 {
    dev.nr_blocks().min(MAX_METADATA_BLOCKS)
}

/// What the output device holds now, and so how it must be written.
pub enum OldMetadata {
    /// No thin superblock: nothing to protect.
    None,
    /// Valid metadata whose blocks (in use per its space map) are left
    /// alone until the new superblock replaces the old one.
    Protect(FixedBitSet),
    /// A thin superblock whose space map cannot be read: the old superblock
    /// is made invalid before anything else is written, so a crash can never
    /// leave it pointing at new blocks.
    Invalidate,
}

impl OldMetadata {
    pub fn probe(dev: &BlockDevice) -> OldMetadata {
        let Ok(sb) = read_superblock(dev, SUPERBLOCK_LOCATION) else {
            return OldMetadata::None;
        };
        let mut walker = Walker::new(dev);
        let (sm, errors) = DiskSpaceMap::load_metadata(&mut walker, sb.metadata_sm());
        if !errors.is_empty() {
            return OldMetadata::Invalidate;
        }
        match sm.in_use(dev) {
            Ok(mut set) => {
                set.grow(dev.nr_blocks() as usize);
                OldMetadata::Protect(set)
            }
            Err(_) => OldMetadata::Invalidate,
        }
    }
}

/// Block 0 written in place of a superblock being replaced: not a thin
/// superblock (the kernel and thin_check refuse it), and not all zeros either
/// (the kernel would format an all-zero superblock as an empty pool).
pub fn invalid_superblock() -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_SIZE];
    let msg = b"thinmeta: metadata being rewritten; an interrupted write left no valid superblock";
    b[512..512 + msg.len()].copy_from_slice(msg);
    b
}

/// Run `feed` (which sends one pool's events to the builder) twice: a dry
/// run that must succeed and fit, then the real write. Returns the result of
/// the real run. `feed` must produce the same events both times.
pub fn build_pool<F>(
    dev: &BlockDevice,
    overrides: Overrides,
    metadata_snap: bool,
    mut feed: F,
) -> Result<BuiltPool, BuildError>
where
    F: FnMut(&mut PoolBuilder, Pass) -> Result<(), BuildError>,
{
    let nr_blocks = metadata_blocks(dev);
    let old = OldMetadata::probe(dev);
    let avoid = match &old {
        OldMetadata::Protect(set) => Some(set.clone()),
        _ => None,
    };

    // The dry run validates everything and measures the exact space needed,
    // beside the old metadata and (the same blocks, packed) over it. It also
    // counts the data references, which the write pass reuses.
    let mut dry = BlockWriter::dry_run(nr_blocks, avoid.clone());
    let mut b = PoolBuilder::new(&mut dry, overrides).with_metadata_snap(metadata_snap);
    if let Err(e) = feed(&mut b, Pass::Validate) {
        return Err(match b.too_small {
            Some(needed) => BuildError::TooSmall {
                needed,
                available: nr_blocks,
            },
            None => e.noting("nothing was written"),
        });
    }
    let (_, data_counts) = b.finish().map_err(BuildError::Metadata)?;
    let beside_old = dry.high_water();
    let packed = dry.nr_allocated() + 1;
    let protected = matches!(old, OldMetadata::Protect(_));
    let (avoid, invalidate) = match old {
        OldMetadata::Protect(_) if beside_old <= nr_blocks => (avoid, false),
        OldMetadata::Protect(_) | OldMetadata::Invalidate => (None, true),
        OldMetadata::None => (None, false),
    };
    if avoid.is_none() && packed > nr_blocks {
        return Err(BuildError::TooSmall {
            needed: packed,
            available: nr_blocks,
        });
    }

    if invalidate {
        dev.write_block(SUPERBLOCK_LOCATION, &invalid_superblock())
            .and_then(|_| dev.sync())
            .map_err(BuildError::Metadata)?;
    }
    let mut w = BlockWriter::new(dev, nr_blocks, avoid);
    let mut b = PoolBuilder::new(&mut w, overrides)
        .with_metadata_snap(metadata_snap)
        .with_data_counts(data_counts);
    feed(&mut b, Pass::Write).map_err(|e| {
        // Only if the input changed between the passes.
        e.noting(if protected && !invalidate {
            "interrupted while writing: the output's previous metadata is intact"
        } else {
            "interrupted while writing: the output holds no valid metadata"
        })
    })?;
    let (built, _) = b.finish().map_err(BuildError::Metadata)?;
    // The dry run stands in for this one (space, old blocks kept): had
    // they allocated differently, that measure was wrong. Not committed.
    if w.nr_allocated() + 1 != packed {
        return Err(BuildError::Metadata(pdata::Error::Other(format!(
            "internal error: the dry run counted {packed} metadata blocks, the build {} (nothing committed)",
            w.nr_allocated() + 1
        ))));
    }
    commit(&mut w, &built.superblock).map_err(BuildError::Metadata)?;
    Ok(built)
}

/// Which run of [`build_pool`] a feed is serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    Validate,
    Write,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(
        "the metadata needs {needed} blocks of 4 KiB ({} MiB) but the device has {available}",
        needed.div_ceil(256)
    )]
    TooSmall { needed: u64, available: u64 },
    #[error(transparent)]
    Metadata(pdata::Error),
    /// The input is wrong (bad XML, nothing recoverable, ...).
    #[error("{0}")]
    Input(String),
    /// The input could not be read.
    #[error("{0}")]
    InputIo(String),
}

impl BuildError {
    /// Add what the output holds after this error to an input error.
    pub fn noting(self, note: &str) -> Self {
        match self {
            BuildError::Input(m) => BuildError::Input(format!("{m} ({note})")),
            BuildError::InputIo(m) => BuildError::InputIo(format!("{m} ({note})")),
            other => other,
        }
    }
}

/// thin_restore: build the metadata described by the XML that `open_input`
/// opens (it is called once per pass, and must give the same bytes each time).
/// The XML is parsed on a second thread while this one builds.
pub fn restore_xml<F>(
    dev: &BlockDevice,
    overrides: Overrides,
    mut open_input: F,
) -> Result<BuiltPool, BuildError>
where
    F: FnMut(Pass) -> io::Result<Box<dyn io::Read + Send>>,
{
    build_pool(dev, overrides, false, |b, pass| {
        let input = open_input(pass).map_err(|e| BuildError::InputIo(e.to_string()))?;
        pipelined_xml(input, overrides.nr_data_blocks, b)
    })
}

/// One dump event, owned, to cross threads. The rare ones are boxed, so
/// an event takes 40 bytes of a batch.
enum Event {
    SuperblockBegin(Box<SuperblockInfo>),
    SuperblockEnd,
    DefBegin(DefName),
    DefEnd,
    DeviceBegin(Box<DeviceInfo>),
    DeviceEnd,
    Mapping(Mapping),
    /// A ref, and the def's number if the producer gave one (else NO_NTH).
    Reference(DefName, u32),
}

const NO_NTH: u32 = u32::MAX;

/// Events per batch sent from the reader to the builder; up to
/// [`IN_FLIGHT`] batches wait (320 KiB: the batches go round and stay in
/// the caches; 64 was no faster on `large` and took 3 MiB more).
const BATCH: usize = 1024;
const IN_FLIGHT: usize = 8;

/// A visitor that batches events into a channel.
struct Batcher {
    batch: Vec<Event>,
    tx: std::sync::mpsc::SyncSender<Vec<Event>>,
    /// Emptied batches the builder hands back: reused, not reallocated (a
    /// batch is too big for malloc's fast bins, and freeing one on another
    /// thread made malloc consolidate its heap every time).
    spare: std::sync::mpsc::Receiver<Vec<Event>>,
}

impl Batcher {
    fn push(&mut self, e: Event) -> io::Result<()> {
        self.batch.push(e);
        if self.batch.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let next = self
            .spare
            .try_recv()
            .unwrap_or_else(|_| Vec::with_capacity(BATCH));
        let full = std::mem::replace(&mut self.batch, next);
        self.tx
            .send(full)
            .map_err(|_| io::Error::other("the builder stopped"))
    }
}

impl MetadataVisitor for Batcher {
    fn superblock_begin(&mut self, sb: &SuperblockInfo) -> io::Result<()> {
        self.push(Event::SuperblockBegin(Box::new(sb.clone())))
    }
    fn superblock_end(&mut self) -> io::Result<()> {
        self.push(Event::SuperblockEnd)
    }
    fn def_begin(&mut self, name: &str) -> io::Result<()> {
        self.push(Event::DefBegin(DefName::new(name)))
    }
    fn def_end(&mut self) -> io::Result<()> {
        self.push(Event::DefEnd)
    }
    fn device_begin(&mut self, d: &DeviceInfo) -> io::Result<()> {
        self.push(Event::DeviceBegin(Box::new(*d)))
    }
    fn device_end(&mut self) -> io::Result<()> {
        self.push(Event::DeviceEnd)
    }
    fn mapping(&mut self, m: &Mapping) -> io::Result<()> {
        self.push(Event::Mapping(*m))
    }
    fn reference(&mut self, name: &str) -> io::Result<()> {
        self.push(Event::Reference(DefName::new(name), NO_NTH))
    }
    fn reference_nth(&mut self, name: &str, nth: u32) -> io::Result<()> {
        self.push(Event::Reference(DefName::new(name), nth))
    }
    fn finish(&mut self) -> io::Result<()> {
        self.flush()
    }
}

fn replay(out: &mut dyn MetadataVisitor, e: &Event) -> io::Result<()> {
    match e {
        Event::SuperblockBegin(sb) => out.superblock_begin(sb),
        Event::SuperblockEnd => out.superblock_end(),
        Event::DefBegin(n) => out.def_begin(n.as_str()),
        Event::DefEnd => out.def_end(),
        Event::DeviceBegin(d) => out.device_begin(d),
        Event::DeviceEnd => out.device_end(),
        Event::Mapping(m) => out.mapping(m),
        Event::Reference(n, NO_NTH) => out.reference(n.as_str()),
        Event::Reference(n, nth) => out.reference_nth(n.as_str(), *nth),
    }
}

/// Parse XML on a thread of its own, feeding `out` on this one.
fn pipelined_xml(
    input: Box<dyn io::Read + Send>,
    nr_data_blocks: Option<u64>,
    out: &mut dyn MetadataVisitor,
) -> Result<(), BuildError> {
    let parsed = pipelined(
        |batcher| crate::thin::xml_read::read_xml_with_pool_size(input, batcher, nr_data_blocks),
        out,
    )?;
    parsed.map(|_| ()).map_err(|e| match e {
        crate::thin::xml_read::XmlError::Read(io) => BuildError::InputIo(io.to_string()),
        e => {
            let mut msg = e.to_string();
            if msg.ends_with("beyond nr_data_blocks 0") {
                // The peer's `thin_dump -m` prints nr_data_blocks="0".
                msg.push_str(" (the dump gives no pool size: use --nr-data-blocks)");
            }
            BuildError::Input(msg)
        }
    })
}

/// Run `produce` (a reader of the input: the XML parser, a metadata walk)
/// on a thread of its own and feed what it visits to `out` on this one, so
/// reading and building take a core each. A failure of the builder wins
/// (the producer then stops at its next send); otherwise the producer's
/// own result is returned.
pub fn pipelined<T: Send, E: Send>(
    produce: impl FnOnce(&mut dyn MetadataVisitor) -> Result<T, E> + Send,
    out: &mut dyn MetadataVisitor,
) -> Result<Result<T, E>, BuildError> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<Event>>(IN_FLIGHT);
    let (back, spare) = std::sync::mpsc::channel::<Vec<Event>>();
    std::thread::scope(|scope| {
        let producer = std::thread::Builder::new().spawn_scoped(scope, move || {
            let mut batcher = Batcher {
                batch: Vec::with_capacity(BATCH),
                tx,
                spare,
            };
            let r = produce(&mut batcher);
            // Deliver what was read before an error too.
            let _ = batcher.flush();
            r
        });
        let producer =
            producer.map_err(|e| BuildError::InputIo(format!("cannot start a thread: {e}")))?;
        let mut built: io::Result<()> = Ok(());
        // Mappings are announced this many events ahead of their use, so
        // their data counts can be loaded while others are processed.
        const AHEAD: usize = 16;
        for batch in rx.iter() {
            for m in batch.iter().take(AHEAD) {
                if let Event::Mapping(m) = m {
                    out.upcoming(m);
                }
            }
            for (i, e) in batch.iter().enumerate() {
                if let Some(Event::Mapping(m)) = batch.get(i + AHEAD) {
                    out.upcoming(m);
                }
                if let Err(err) = replay(out, e) {
                    built = Err(err);
                    break;
                }
            }
            if built.is_err() {
                break;
            }
            let mut batch = batch;
            batch.clear();
            let _ = back.send(batch);
        }
        drop(rx);
        // A panic in the reader is a bug: passed on as one, so the fuzzers
        // and tests see it (not turned into an input error).
        let produced = producer
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        built.map_err(|e| BuildError::Input(e.to_string()))?;
        Ok(produced)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what reaches it; fails at the mapping of origin `fail_at`.
    #[derive(Default)]
    struct Recorder {
        seen: Vec<String>,
        fail_at: Option<u64>,
    }

    impl MetadataVisitor for Recorder {
        fn def_begin(&mut self, name: &str) -> io::Result<()> {
            self.seen.push(format!("def {name}"));
            Ok(())
        }
        fn mapping(&mut self, m: &Mapping) -> io::Result<()> {
            if Some(m.origin_begin) == self.fail_at {
                return Err(other("builder full"));
            }
            self.seen.push(format!("map {}", m.origin_begin));
            Ok(())
        }
        fn reference(&mut self, name: &str) -> io::Result<()> {
            self.seen.push(format!("ref {name}"));
            Ok(())
        }
        fn finish(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn map(o: u64) -> Mapping {
        Mapping {
            origin_begin: o,
            data_begin: o,
            len: 1,
            time: 0,
        }
    }

    #[test]
    fn pipelined_delivers_every_event_in_order_across_batches() {
        let long = "x".repeat(40); // too long to travel inline
        let n = 3 * BATCH as u64 + 5;
        let mut r = Recorder::default();
        let produced = pipelined(
            |v| -> Result<u64, String> {
                v.def_begin("7").map_err(|e| e.to_string())?;
                for o in 0..n {
                    v.mapping(&map(o)).map_err(|e| e.to_string())?;
                }
                v.reference(&long).map_err(|e| e.to_string())?;
                Ok(n)
            },
            &mut r,
        )
        .unwrap();
        assert_eq!(produced, Ok(n));
        assert_eq!(r.seen.len() as u64, n + 2);
        assert_eq!(r.seen[0], "def 7");
        assert!((0..n as usize).all(|i| r.seen[i + 1] == format!("map {i}")));
        assert_eq!(r.seen[n as usize + 1], format!("ref {long}"));
    }

    #[test]
    fn pipelined_reports_the_builders_failure_first_then_the_readers() {
        // The builder fails mid-stream: its error wins, and the reader,
        // blocked on a full channel, is released.
        let mut r = Recorder {
            fail_at: Some(2000),
            ..Default::default()
        };
        let e = pipelined(
            |v| -> Result<(), String> {
                for o in 0..1_000_000 {
                    v.mapping(&map(o)).map_err(|e| e.to_string())?;
                }
                Ok(())
            },
            &mut r,
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "builder full");
        assert_eq!(r.seen.len(), 2000);

        // The reader fails: its error is returned, after what it read before.
        let mut r = Recorder::default();
        let produced = pipelined(
            |v| -> Result<(), String> {
                v.mapping(&map(0)).map_err(|e| e.to_string())?;
                Err("bad input".into())
            },
            &mut r,
        )
        .unwrap();
        assert_eq!(produced, Err("bad input".to_string()));
        assert_eq!(r.seen, ["map 0"]);
    }

    #[test]
    #[should_panic(expected = "reader bug")]
    fn pipelined_passes_on_a_readers_panic() {
        let mut r = Recorder::default();
        let _ = pipelined(|_| -> Result<(), ()> { panic!("reader bug") }, &mut r);
    }

    fn sb(nr_data_blocks: u64) -> SuperblockInfo {
        SuperblockInfo {
            uuid: String::new(),
            time: 0,
            transaction: 0,
            flags: 0,
            version: 2,
            data_block_size: 128,
            nr_data_blocks,
            metadata_snap: None,
        }
    }

    fn dev(dev_id: u64) -> DeviceInfo {
        DeviceInfo {
            dev_id,
            mapped_blocks: 0,
            transaction: 0,
            creation_time: 0,
            snap_time: 0,
        }
    }

    /// Build defs "a" (2 mappings) and "b" (3) and one device that refers
    /// to def `nth` under `name`; the mappings and defs it ended up with.
    fn refer(name: &str, nth: u32) -> (Vec<(u64, u64)>, io::Result<()>) {
        let mut w = BlockWriter::dry_run(1000, None);
        let mut b = PoolBuilder::new(&mut w, Overrides::default());
        b.superblock_begin(&sb(100)).unwrap();
        for (def, n) in [("a", 2u64), ("b", 3)] {
            b.def_begin(def).unwrap();
            for o in 0..n {
                b.mapping(&Mapping {
                    origin_begin: o,
                    data_begin: o,
                    len: 1,
                    time: 0,
                })
                .unwrap();
            }
            b.def_end().unwrap();
        }
        b.device_begin(&dev(1)).unwrap();
        b.reference_nth(name, nth).unwrap();
        b.device_end().unwrap();
        let mapped = b
            .devices
            .iter()
            .map(|(d, _)| (d.dev_id, d.mapped_blocks))
            .collect();
        (mapped, b.superblock_end())
    }

    #[test]
    fn an_event_takes_40_bytes() {
        assert_eq!(std::mem::size_of::<Event>(), 40);
    }

    #[test]
    fn a_ref_by_number_is_checked_against_the_name() {
        // Right number: def b's 3 mappings; def a unreferenced.
        let (mapped, end) = refer("b", 1);
        assert_eq!(mapped, vec![(1, 3)]);
        assert!(end.unwrap_err().to_string().contains("def \"a\""));
        // A wrong number (or none) is not trusted: the name decides.
        for nth in [0, 7, NO_NTH] {
            let (mapped, end) = refer("b", nth);
            assert_eq!(mapped, vec![(1, 3)], "nth {nth}");
            assert!(end.unwrap_err().to_string().contains("def \"a\""));
        }
        let (mapped, _) = refer("a", 1);
        assert_eq!(mapped, vec![(1, 2)]);
    }
}
