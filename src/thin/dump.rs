//! thin_dump: metadata as a stream of events, and the writers that format
//! them (the peer's XML byte for byte, its human-readable form, and JSON).
//!
//! One event model serves both directions: dump produces events from the
//! trees; restore (later) produces them from XML and feeds a builder.

use std::io::{self, Write};

use crate::pdata::btree::{parse_leaf, salvage_leaves, Walker};
use crate::pdata::io::BlockDevice;
use crate::thin::device::BlockTime;
use crate::thin::metadata::{Devices, ThinDevice};
use crate::thin::runs::{plan_sharing, Entry};
use crate::thin::superblock::{read_superblock, Superblock, SUPERBLOCK_LOCATION};
use crate::thin::Error;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuperblockInfo {
    pub uuid: String,
    pub time: u64,
    pub transaction: u64,
    pub flags: u32,
    pub version: u32,
    pub data_block_size: u32,
    pub nr_data_blocks: u64,
    /// Block of the held metadata snapshot, if any (only JSON prints it).
    pub metadata_snap: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceInfo {
    pub dev_id: u64,
    pub mapped_blocks: u64,
    pub transaction: u64,
    pub creation_time: u64,
    pub snap_time: u64,
}

/// `len` consecutive virtual blocks mapped to consecutive data blocks, all written at `time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    pub origin_begin: u64,
    pub data_begin: u64,
    pub len: u64,
    pub time: u32,
}

/// The event stream of a dump: `superblock_begin`, then shared runs
/// (`def_begin`, mappings, `def_end`) and devices (`device_begin`, mappings
/// and references to shared runs by name, `device_end`), `superblock_end`,
/// `finish`.
///
/// The brackets default to doing nothing, for visitors that only gather
/// mappings. `mapping`, `reference` and `finish` have no default, so every
/// visitor decides about them: a visitor that dropped `mapping` or
/// `reference` would lose a device's mappings (silently for `reference`,
/// which only shared runs produce), and one that buffers or forwards
/// events and dropped `finish` would lose its tail. A visitor that forwards
/// events (a filter between a reader and a writer) must forward every
/// method, the brackets included.
pub trait MetadataVisitor {
    fn superblock_begin(&mut self, _sb: &SuperblockInfo) -> io::Result<()> {
        Ok(())
    }
    fn superblock_end(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// A shared run of mappings, referenced by devices by name.
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
    fn mapping(&mut self, m: &Mapping) -> io::Result<()>;
    /// The current device maps the shared run `name` (defined before).
    fn reference(&mut self, name: &str) -> io::Result<()>;
    /// [`MetadataVisitor::reference`] to the def that was the `nth` (from
    /// 0) to begin: a visitor that keeps its defs in a list finds it
    /// without a lookup by name. Producers that number their defs call it.
    fn reference_nth(&mut self, name: &str, _nth: u32) -> io::Result<()> {
        self.reference(name)
    }
    fn finish(&mut self) -> io::Result<()>;
    /// A hint: `m` will be visited soon (a visitor may start loading what it
    /// will need for it).
    fn upcoming(&mut self, _m: &Mapping) {}
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Xml,
    HumanReadable,
    Json,
}

#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// None: the live metadata. Some(None): the held metadata snapshot.
    /// Some(Some(b)): a metadata snapshot superblock at block b.
    pub metadata_snap: Option<Option<u64>>,
    /// Only these devices (all when empty).
    pub dev_ids: Vec<u64>,
    pub skip_mappings: bool,
    /// Values printed in place of the superblock's (`thin_dump
    /// --transaction-id/--data-block-size/--nr-data-blocks`), as the peer
    /// prints them: the data block size as given, the transaction id and
    /// the pool size only when larger (a dump never goes back in
    /// transactions or drops mapped blocks). The mappings are dumped as
    /// they are.
    pub overrides: crate::thin::restore::Overrides,
}

/// Which superblock a read-only tool works from (live, or a metadata snapshot's copy).
pub fn select_superblock(
    dev: &BlockDevice,
    metadata_snap: Option<Option<u64>>,
) -> Result<Superblock, Error> {
    let sb =
        read_superblock(dev, SUPERBLOCK_LOCATION).map_err(|e| Error::metadata("superblock", e))?;
    match metadata_snap {
        None => Ok(sb),
        Some(loc) => {
            let loc = match loc.or((sb.metadata_snap != 0).then_some(sb.metadata_snap)) {
                Some(l) => l,
                None => return Err(Error::NoMetadataSnap),
            };
            read_superblock(dev, loc).map_err(|e| {
                Error::metadata(format!("metadata snapshot superblock (block {loc})"), e)
            })
        }
    }
}

/// Dump the metadata on `dev` to `out`. `progress` is told how many leaves
/// have been emitted, out of the total it is first given.
pub fn dump(
    dev: &BlockDevice,
    opts: &DumpOptions,
    out: &mut dyn MetadataVisitor,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), Error> {
    let sb = select_superblock(dev, opts.metadata_snap)?;
    let mut walker = Walker::new(dev);
    let devices = Devices::read(&mut walker, &sb, opts.skip_mappings);
    if let Some((tree, e)) = devices.first_fatal() {
        return Err(Error::metadata(tree, e.clone()));
    }
    let selected = |id: &u64| opts.dev_ids.is_empty() || opts.dev_ids.contains(id);

    let ov = &opts.overrides;
    let info = SuperblockInfo {
        uuid: String::new(),
        time: sb.time as u64,
        transaction: sb.transaction_id.max(ov.transaction_id.unwrap_or(0)),
        flags: sb.flags,
        version: 2,
        data_block_size: ov.data_block_size.unwrap_or(sb.data_block_size),
        nr_data_blocks: sb.data_sm().nr_blocks.max(ov.nr_data_blocks.unwrap_or(0)),
        metadata_snap: (sb.metadata_snap != 0).then_some(sb.metadata_snap),
    };

    if opts.skip_mappings {
        out.superblock_begin(&info)?;
        for (&id, d) in devices.details.iter().filter(|(id, _)| selected(id)) {
            out.device_begin(&device_info(&ThinDevice {
                id,
                details: *d,
                root: 0,
            }))?;
            out.device_end()?;
        }
        out.superblock_end()?;
        out.finish()?;
        return Ok(());
    }

    let (devs, errs) = devices.joined();
    if let Some(e) = errs.into_iter().next() {
        return Err(Error::Inconsistent(e));
    }
    let devs: Vec<ThinDevice> = devs.into_iter().filter(|d| selected(&d.id)).collect();
    emit_devices(&mut walker, &info, &devs, false, out, progress)
}

/// Emit the events of `devs` (their mapping trees walked from their roots).
/// Strict: the first damaged node is an error. Salvage (`salvage`, for
/// repair): damaged subtrees and leaves are left out, everything readable is
/// emitted, and each device's `mapped_blocks` is recounted from what is
/// readable (counted as the salvage reads the leaves).
pub fn emit_devices(
    walker: &mut Walker,
    info: &SuperblockInfo,
    devs: &[ThinDevice],
    salvage: bool,
    out: &mut dyn MetadataVisitor,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), Error> {
    let plan = plan_emit(walker, info, devs, salvage)?;
    emit_planned(walker, &plan, info, devs, out, progress)
}

/// One step of an [`EmitPlan`]: the events between leaves, and a leaf.
enum Ev {
    DefBegin(u64),
    DefEnd,
    DevBegin(usize),
    DevEnd,
    Leaf,
    Ref(u64),
}

/// The layout of what [`emit_devices`] emits: which trees are walked and
/// which runs of leaves are shared is settled once (the walk of every tree
/// is most of the cost), then [`emit_planned`] streams the leaves in this
/// order as often as needed (a rebuild reads them once to validate and
/// once to write).
pub struct EmitPlan {
    events: Vec<Ev>,
    leaves: Vec<u64>,
    /// Salvage: each device's mapped_blocks, recounted from its valid leaves.
    mapped: Option<Vec<u64>>,
    salvage: bool,
}

/// Walk `devs`' trees and lay out the events of [`emit_devices`].
pub fn plan_emit(
    walker: &mut Walker,
    info: &SuperblockInfo,
    devs: &[ThinDevice],
    salvage: bool,
) -> Result<EmitPlan, Error> {
    let dev = walker.device();
    // Strict: walk every selected device's mapping tree (shared subtrees
    // once). Salvage: each tree on its own, keeping the leaves that are
    // valid in that tree (damage in one tree takes nothing from another).
    let salvaged: Vec<Vec<u64>>;
    // Per metadata block: the mappings inside the pool of the valid leaf
    // there (4 bytes a block: a map costs more on a big pool).
    let mut inside_counts: Vec<u32> = Vec::new();
    let mut trees = Vec::with_capacity(devs.len());
    if salvage {
        let roots: Vec<u64> = devs.iter().map(|d| d.root).collect();
        inside_counts = vec![0; dev.nr_blocks() as usize];
        // Salvage recounts mapped_blocks from what is readable, so rebuilt
        // details agree with the rebuilt trees: each valid leaf's mappings
        // inside the pool, counted as salvage_leaves reads it.
        salvaged = salvage_leaves(dev, &roots, 8, |node| {
            let inside = (0..node.nr_entries())
                .filter(|&i| BlockTime::unpack(node.value::<u64>(i)).block < info.nr_data_blocks)
                .count();
            inside_counts[node.block() as usize] = inside as u32;
        });
    } else {
        salvaged = Vec::new();
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
    }
    let seqs: Vec<&[u64]> = if salvage {
        salvaged.iter().map(Vec::as_slice).collect()
    } else {
        trees.iter().map(|t| walker.leaves(t)).collect()
    };
    // Salvage: each device's mapped_blocks, from the counts above.
    let mapped: Option<Vec<u64>> = salvage.then(|| {
        seqs.iter()
            .map(|s| {
                s.iter()
                    .map(|&l| inside_counts.get(l as usize).map_or(0, |&n| n as u64))
                    .sum()
            })
            .collect()
    });
    let plan = plan_sharing(dev.nr_blocks(), &seqs);

    // Lay the output out as events; emit_planned streams the leaves in
    // that order.
    let mut events = Vec::new();
    let mut leaves = Vec::new();
    for run in &plan.defs {
        events.push(Ev::DefBegin(run.leaves[0]));
        for &l in &run.leaves {
            events.push(Ev::Leaf);
            leaves.push(l);
        }
        events.push(Ev::DefEnd);
    }
    for (i, seq) in plan.sequences.iter().enumerate() {
        events.push(Ev::DevBegin(i));
        for e in seq {
            match *e {
                Entry::Leaf(l) => {
                    events.push(Ev::Leaf);
                    leaves.push(l);
                }
                Entry::Ref(r) => events.push(Ev::Ref(r)),
            }
        }
        events.push(Ev::DevEnd);
    }
    Ok(EmitPlan {
        events,
        leaves,
        mapped,
        salvage,
    })
}

/// Emit the events `plan` lays out, reading the leaves through `walker`;
/// `walker` and `devs` are the ones [`plan_emit`] was given.
pub fn emit_planned(
    walker: &Walker,
    plan: &EmitPlan,
    info: &SuperblockInfo,
    devs: &[ThinDevice],
    out: &mut dyn MetadataVisitor,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), Error> {
    // Salvaged leaves were checked against their own trees' key ranges.
    fn leaf<'a>(
        walker: &Walker,
        salvage: bool,
        b: u64,
        d: &'a [u8],
    ) -> crate::pdata::Result<crate::pdata::btree::Node<'a>> {
        if salvage {
            parse_leaf(b, d, 8)
        } else {
            walker.check_leaf(b, d, 8)
        }
    }
    let dev = walker.device();
    let EmitPlan {
        events,
        leaves,
        mapped,
        salvage,
    } = plan;
    let salvage = *salvage;
    out.superblock_begin(info)?;
    let total = leaves.len() as u64;
    let mut runs = RunBuilder::default();
    let mut cursor = 0usize;
    let mut owner: Option<u64> = None; // device being emitted (for messages)
    let mut name = itoa::Buffer::new();

    // Emit the non-leaf events up to the next leaf.
    let mut advance = |out: &mut dyn MetadataVisitor,
                       cursor: &mut usize,
                       runs: &mut RunBuilder,
                       owner: &mut Option<u64>|
     -> io::Result<()> {
        while *cursor < events.len() {
            match &events[*cursor] {
                Ev::Leaf => return Ok(()),
                ev => {
                    if let Some(m) = runs.take() {
                        out.mapping(&m)?;
                    }
                    match ev {
                        Ev::DefBegin(n) => out.def_begin(name.format(*n))?,
                        Ev::DefEnd => out.def_end()?,
                        Ev::DevBegin(i) => {
                            *owner = Some(devs[*i].id);
                            let mut d = device_info(&devs[*i]);
                            if let Some(m) = &mapped {
                                d.mapped_blocks = m[*i];
                            }
                            out.device_begin(&d)?
                        }
                        Ev::DevEnd => out.device_end()?,
                        Ev::Ref(n) => out.reference(name.format(*n))?,
                        Ev::Leaf => unreachable!(),
                    }
                }
            }
            *cursor += 1;
        }
        Ok(())
    };

    let mut emitted = 0u64;
    progress(0, total);
    dev.read_in_order(leaves, 1024, |_, b, data| -> Result<(), Error> {
        advance(out, &mut cursor, &mut runs, &mut owner)?;
        cursor += 1; // the leaf
        let node = match data.and_then(|d| leaf(walker, salvage, b, d)) {
            Ok(node) => node,
            Err(_) if salvage => return Ok(()),
            Err(e) => {
                let ctx = match owner {
                    Some(id) => format!("mapping tree of device {id}"),
                    None => "shared mapping leaves".to_string(),
                };
                return Err(Error::metadata(ctx, e));
            }
        };
        for i in 0..node.nr_entries() {
            let mut bt = BlockTime::unpack(node.value::<u64>(i));
            if salvage && bt.block >= info.nr_data_blocks {
                continue; // points outside the pool: damage
            }
            if salvage && bt.time as u64 > info.time {
                // Written after the pool's time: damage. Time 0 treats the
                // mapping as shared (copied on write), which is always safe.
                bt.time = 0;
            }
            if let Some(m) = runs.push(node.key(i), bt) {
                out.mapping(&m)?;
            }
        }
        emitted += 1;
        if emitted % 4096 == 0 {
            progress(emitted, total);
        }
        Ok(())
    })?;
    advance(out, &mut cursor, &mut runs, &mut owner)?;
    progress(total, total);
    out.superblock_end()?;
    out.finish()?;
    Ok(())
}

pub fn device_info(d: &ThinDevice) -> DeviceInfo {
    DeviceInfo {
        dev_id: d.id,
        mapped_blocks: d.details.mapped_blocks,
        transaction: d.details.transaction_id,
        creation_time: d.details.creation_time as u64,
        snap_time: d.details.snapshotted_time as u64,
    }
}

/// Merges consecutive mappings into runs: same time, consecutive virtual and data blocks.
#[derive(Default)]
struct RunBuilder {
    cur: Option<Mapping>,
}

impl RunBuilder {
    #[inline]
    fn push(&mut self, vblock: u64, bt: BlockTime) -> Option<Mapping> {
        if let Some(m) = &mut self.cur {
            if vblock == m.origin_begin + m.len
                && bt.block == m.data_begin + m.len
                && bt.time == m.time
            {
                m.len += 1;
                return None;
            }
        }
        self.cur.replace(Mapping {
            origin_begin: vblock,
            data_begin: bt.block,
            len: 1,
            time: bt.time,
        })
    }

    fn take(&mut self) -> Option<Mapping> {
        self.cur.take()
    }
}

//------------------------------------------------------------------------------
// Writers

/// Lines of the peer's XML: two spaces of indent a level, one element a
/// line, no declaration and no trailing newline. Shared by every XML writer.
pub struct XmlLines<W: Write> {
    pub w: W,
    pub depth: usize,
    started: bool,
}

impl<W: Write> XmlLines<W> {
    pub fn new(w: W) -> Self {
        XmlLines {
            w,
            depth: 0,
            started: false,
        }
    }

    /// Start a line at the current depth.
    pub fn line(&mut self) -> io::Result<()> {
        if self.started {
            self.w.write_all(b"\n")?;
        }
        self.started = true;
        const SPACES: &[u8] = &[b' '; 64];
        let mut n = self.depth * 2;
        while n > 0 {
            let k = n.min(SPACES.len());
            self.w.write_all(&SPACES[..k])?;
            n -= k;
        }
        Ok(())
    }

    pub fn attr(&mut self, name: &str, v: u64) -> io::Result<()> {
        let mut b = itoa::Buffer::new();
        self.w.write_all(b" ")?;
        self.w.write_all(name.as_bytes())?;
        self.w.write_all(b"=\"")?;
        self.w.write_all(b.format(v).as_bytes())?;
        self.w.write_all(b"\"")
    }

    pub fn attr_str(&mut self, name: &str, v: &str) -> io::Result<()> {
        self.w.write_all(b" ")?;
        self.w.write_all(name.as_bytes())?;
        self.w.write_all(b"=\"")?;
        write_escaped(&mut self.w, v)?;
        self.w.write_all(b"\"")
    }

    /// A closing tag on its own line, one level up.
    pub fn close(&mut self, tag: &str) -> io::Result<()> {
        self.depth -= 1;
        self.line()?;
        self.w.write_all(b"</")?;
        self.w.write_all(tag.as_bytes())?;
        self.w.write_all(b">")
    }

    pub fn into_inner(self) -> W {
        self.w
    }
}

/// The peer's XML: two-space indent, one element a line, no declaration and
/// no trailing newline.
pub struct XmlWriter<W: Write> {
    x: XmlLines<W>,
}

impl<W: Write> XmlWriter<W> {
    pub fn new(w: W) -> Self {
        XmlWriter {
            x: XmlLines::new(w),
        }
    }

    pub fn into_inner(self) -> W {
        self.x.into_inner()
    }
}

fn write_escaped(w: &mut impl Write, s: &str) -> io::Result<()> {
    for c in s.chars() {
        match c {
            '<' => w.write_all(b"&lt;")?,
            '>' => w.write_all(b"&gt;")?,
            '&' => w.write_all(b"&amp;")?,
            '"' => w.write_all(b"&quot;")?,
            '\'' => w.write_all(b"&apos;")?,
            c => {
                let mut buf = [0u8; 4];
                w.write_all(c.encode_utf8(&mut buf).as_bytes())?
            }
        }
    }
    Ok(())
}

impl<W: Write> MetadataVisitor for XmlWriter<W> {
    fn superblock_begin(&mut self, sb: &SuperblockInfo) -> io::Result<()> {
        self.x.line()?;
        self.x.w.write_all(b"<superblock")?;
        self.x.attr_str("uuid", &sb.uuid)?;
        self.x.attr("time", sb.time)?;
        self.x.attr("transaction", sb.transaction)?;
        if sb.flags != 0 {
            self.x.attr("flags", sb.flags as u64)?;
        }
        self.x.attr("version", sb.version as u64)?;
        self.x.attr("data_block_size", sb.data_block_size as u64)?;
        // The peer never prints metadata_snap; neither do we (byte identity).
        self.x.attr("nr_data_blocks", sb.nr_data_blocks)?;
        self.x.w.write_all(b">")?;
        self.x.depth += 1;
        Ok(())
    }
    fn superblock_end(&mut self) -> io::Result<()> {
        self.x.close("superblock")
    }
    fn def_begin(&mut self, name: &str) -> io::Result<()> {
        self.x.line()?;
        self.x.w.write_all(b"<def")?;
        self.x.attr_str("name", name)?;
        self.x.w.write_all(b">")?;
        self.x.depth += 1;
        Ok(())
    }
    fn def_end(&mut self) -> io::Result<()> {
        self.x.close("def")
    }
    fn device_begin(&mut self, d: &DeviceInfo) -> io::Result<()> {
        self.x.line()?;
        self.x.w.write_all(b"<device")?;
        self.x.attr("dev_id", d.dev_id)?;
        self.x.attr("mapped_blocks", d.mapped_blocks)?;
        self.x.attr("transaction", d.transaction)?;
        self.x.attr("creation_time", d.creation_time)?;
        self.x.attr("snap_time", d.snap_time)?;
        self.x.w.write_all(b">")?;
        self.x.depth += 1;
        Ok(())
    }
    fn device_end(&mut self) -> io::Result<()> {
        self.x.close("device")
    }
    fn mapping(&mut self, m: &Mapping) -> io::Result<()> {
        self.x.line()?;
        if m.len == 1 {
            self.x.w.write_all(b"<single_mapping")?;
            self.x.attr("origin_block", m.origin_begin)?;
            self.x.attr("data_block", m.data_begin)?;
        } else {
            self.x.w.write_all(b"<range_mapping")?;
            self.x.attr("origin_begin", m.origin_begin)?;
            self.x.attr("data_begin", m.data_begin)?;
            self.x.attr("length", m.len)?;
        }
        self.x.attr("time", m.time as u64)?;
        self.x.w.write_all(b"/>")
    }
    fn reference(&mut self, name: &str) -> io::Result<()> {
        self.x.line()?;
        self.x.w.write_all(b"<ref")?;
        self.x.attr_str("name", name)?;
        self.x.w.write_all(b"/>")
    }
    fn finish(&mut self) -> io::Result<()> {
        self.x.w.flush()
    }
}

/// The peer's `--format human_readable`.
pub struct HumanWriter<W: Write> {
    w: W,
}

impl<W: Write> HumanWriter<W> {
    pub fn new(w: W) -> Self {
        HumanWriter { w }
    }
}

impl<W: Write> MetadataVisitor for HumanWriter<W> {
    fn superblock_begin(&mut self, sb: &SuperblockInfo) -> io::Result<()> {
        write!(
            self.w,
            "begin superblock: \"{}\", {}, {}, {}, {}, {}, {}",
            sb.uuid,
            sb.time,
            sb.transaction,
            sb.flags,
            sb.version,
            sb.data_block_size,
            sb.nr_data_blocks
        )?;
        // As the peer, the held metadata snapshot is not printed.
        writeln!(self.w)
    }
    fn superblock_end(&mut self) -> io::Result<()> {
        self.w.write_all(b"end superblock\n")
    }
    fn def_begin(&mut self, name: &str) -> io::Result<()> {
        writeln!(self.w, "def: {name}")
    }
    fn def_end(&mut self) -> io::Result<()> {
        self.w.write_all(b"\n")
    }
    fn device_begin(&mut self, d: &DeviceInfo) -> io::Result<()> {
        writeln!(
            self.w,
            "device: {}\nmapped_blocks: {}\ntransaction: {}\ncreation time: {}\nsnap time: {}",
            d.dev_id, d.mapped_blocks, d.transaction, d.creation_time, d.snap_time
        )
    }
    fn device_end(&mut self) -> io::Result<()> {
        self.w.write_all(b"\n")
    }
    fn mapping(&mut self, m: &Mapping) -> io::Result<()> {
        writeln!(
            self.w,
            "    ({}..{}) -> ({}..{}), {}",
            m.origin_begin,
            m.origin_begin + m.len - 1,
            m.data_begin,
            m.data_begin + m.len - 1,
            m.time
        )
    }
    fn reference(&mut self, name: &str) -> io::Result<()> {
        writeln!(self.w, "    ref: {name}")
    }
    fn finish(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// JSON output (thinmeta's own; schema in man/thin_dump.8 and docs/json-dump.md):
/// `{"superblock":{...},"defs":[{"name":..,"mappings":[..]}],"devices":[{..,"mappings":[..]}]}`
/// where each mapping is `{"origin_begin":..,"data_begin":..,"length":..,"time":..}`
/// or `{"ref":"NAME"}`. One JSON document, streamed.
pub struct JsonWriter<W: Write> {
    w: W,
    /// Whether the current array has an element already.
    need_comma: bool,
    in_devices: bool,
    defs_open: bool,
}

impl<W: Write> JsonWriter<W> {
    pub fn new(w: W) -> Self {
        JsonWriter {
            w,
            need_comma: false,
            in_devices: false,
            defs_open: false,
        }
    }
    fn sep(&mut self) -> io::Result<()> {
        if self.need_comma {
            self.w.write_all(b",")?;
        }
        self.need_comma = true;
        Ok(())
    }
    fn num(&mut self, key: &str, v: u64, comma: bool) -> io::Result<()> {
        let mut b = itoa::Buffer::new();
        if comma {
            self.w.write_all(b",")?;
        }
        write!(self.w, "\"{key}\":")?;
        self.w.write_all(b.format(v).as_bytes())
    }
    fn string(&mut self, s: &str) -> io::Result<()> {
        self.w.write_all(b"\"")?;
        for c in s.chars() {
            match c {
                '"' => self.w.write_all(b"\\\"")?,
                '\\' => self.w.write_all(b"\\\\")?,
                c if (c as u32) < 0x20 => write!(self.w, "\\u{:04x}", c as u32)?,
                c => write!(self.w, "{c}")?,
            }
        }
        self.w.write_all(b"\"")
    }
    fn open_devices(&mut self) -> io::Result<()> {
        if !self.in_devices {
            if !self.defs_open {
                self.w.write_all(b",\"defs\":[")?;
            }
            self.w.write_all(b"\n],\"devices\":[")?;
            self.in_devices = true;
            self.defs_open = true;
            self.need_comma = false;
        }
        Ok(())
    }
}

impl<W: Write> MetadataVisitor for JsonWriter<W> {
    fn superblock_begin(&mut self, sb: &SuperblockInfo) -> io::Result<()> {
        self.w.write_all(b"{\"superblock\":{\"uuid\":")?;
        self.string(&sb.uuid)?;
        self.num("time", sb.time, true)?;
        self.num("transaction", sb.transaction, true)?;
        self.num("flags", sb.flags as u64, true)?;
        self.num("version", sb.version as u64, true)?;
        self.num("data_block_size", sb.data_block_size as u64, true)?;
        self.num("nr_data_blocks", sb.nr_data_blocks, true)?;
        match sb.metadata_snap {
            Some(b) => self.num("metadata_snap", b, true)?,
            None => self.w.write_all(b",\"metadata_snap\":null")?,
        }
        self.w.write_all(b"}")?;
        Ok(())
    }
    fn superblock_end(&mut self) -> io::Result<()> {
        self.open_devices()?;
        self.w.write_all(b"\n]}\n")
    }
    fn def_begin(&mut self, name: &str) -> io::Result<()> {
        if !self.defs_open {
            self.w.write_all(b",\"defs\":[")?;
            self.defs_open = true;
            self.need_comma = false;
        }
        self.sep()?;
        self.w.write_all(b"\n{\"name\":")?;
        self.string(name)?;
        self.w.write_all(b",\"mappings\":[")?;
        self.need_comma = false;
        Ok(())
    }
    fn def_end(&mut self) -> io::Result<()> {
        self.w.write_all(b"]}")?;
        self.need_comma = true;
        Ok(())
    }
    fn device_begin(&mut self, d: &DeviceInfo) -> io::Result<()> {
        self.open_devices()?;
        self.sep()?;
        self.w.write_all(b"\n{")?;
        self.num("dev_id", d.dev_id, false)?;
        self.num("mapped_blocks", d.mapped_blocks, true)?;
        self.num("transaction", d.transaction, true)?;
        self.num("creation_time", d.creation_time, true)?;
        self.num("snap_time", d.snap_time, true)?;
        self.w.write_all(b",\"mappings\":[")?;
        self.need_comma = false;
        Ok(())
    }
    fn device_end(&mut self) -> io::Result<()> {
        self.w.write_all(b"]}")?;
        self.need_comma = true;
        Ok(())
    }
    fn mapping(&mut self, m: &Mapping) -> io::Result<()> {
        self.sep()?;
        self.w.write_all(b"\n{")?;
        self.num("origin_begin", m.origin_begin, false)?;
        self.num("data_begin", m.data_begin, true)?;
        self.num("length", m.len, true)?;
        self.num("time", m.time as u64, true)?;
        self.w.write_all(b"}")
    }
    fn reference(&mut self, name: &str) -> io::Result<()> {
        self.sep()?;
        self.w.write_all(b"\n{\"ref\":")?;
        self.string(name)?;
        self.w.write_all(b"}")
    }
    fn finish(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// Test helper: a dump collected per device, refs expanded.
#[cfg(test)]
pub(crate) mod testutil {
    use std::collections::{BTreeMap, HashMap};
    use std::io;

    use super::*;

    /// A device and its mappings, one (virtual, data, time) a block, in
    /// the order the dump gave them.
    pub type DevMaps = (DeviceInfo, Blocks);
    /// (virtual, data, time), one a block.
    pub type Blocks = Vec<(u64, u64, u32)>;

    #[derive(Default)]
    pub struct Collect {
        pub sb: Option<SuperblockInfo>,
        pub devs: BTreeMap<u64, DevMaps>,
        /// How many `<ref>`s the dump held.
        pub refs: u64,
        defs: HashMap<String, Blocks>,
        def: Option<(String, Blocks)>,
        dev: Option<DevMaps>,
    }

    impl MetadataVisitor for Collect {
        fn superblock_begin(&mut self, sb: &SuperblockInfo) -> io::Result<()> {
            self.sb = Some(sb.clone());
            Ok(())
        }
        fn def_begin(&mut self, name: &str) -> io::Result<()> {
            self.def = Some((name.to_string(), Vec::new()));
            Ok(())
        }
        fn def_end(&mut self) -> io::Result<()> {
            let (n, v) = self.def.take().expect("def_end without def_begin");
            self.defs.insert(n, v);
            Ok(())
        }
        fn device_begin(&mut self, d: &DeviceInfo) -> io::Result<()> {
            self.dev = Some((*d, Vec::new()));
            Ok(())
        }
        fn device_end(&mut self) -> io::Result<()> {
            let (d, v) = self.dev.take().expect("device_end without device_begin");
            self.devs.insert(d.dev_id, (d, v));
            Ok(())
        }
        fn mapping(&mut self, m: &Mapping) -> io::Result<()> {
            let blocks = (0..m.len).map(|i| (m.origin_begin + i, m.data_begin + i, m.time));
            match (&mut self.def, &mut self.dev) {
                (Some((_, v)), _) | (None, Some((_, v))) => v.extend(blocks),
                (None, None) => panic!("mapping outside a def or device"),
            }
            Ok(())
        }
        fn reference(&mut self, name: &str) -> io::Result<()> {
            self.refs += 1;
            let d = &self.defs[name];
            self.dev
                .as_mut()
                .expect("ref outside a device")
                .1
                .extend_from_slice(d);
            Ok(())
        }
        fn finish(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(out: &mut dyn MetadataVisitor) {
        let sb = SuperblockInfo {
            uuid: String::new(),
            time: 1,
            transaction: 2,
            flags: 0,
            version: 2,
            data_block_size: 128,
            nr_data_blocks: 1024,
            metadata_snap: None,
        };
        out.superblock_begin(&sb).unwrap();
        out.def_begin("17").unwrap();
        out.mapping(&Mapping {
            origin_begin: 0,
            data_begin: 0,
            len: 64,
            time: 0,
        })
        .unwrap();
        out.def_end().unwrap();
        let d = DeviceInfo {
            dev_id: 1,
            mapped_blocks: 65,
            transaction: 0,
            creation_time: 0,
            snap_time: 1,
        };
        out.device_begin(&d).unwrap();
        out.reference("17").unwrap();
        out.mapping(&Mapping {
            origin_begin: 70,
            data_begin: 5,
            len: 1,
            time: 1,
        })
        .unwrap();
        out.device_end().unwrap();
        out.superblock_end().unwrap();
        out.finish().unwrap();
    }

    #[test]
    fn xml_layout_matches_the_peer() {
        let mut w = XmlWriter::new(Vec::new());
        sample(&mut w);
        let s = String::from_utf8(w.into_inner()).unwrap();
        assert_eq!(
            s,
            "<superblock uuid=\"\" time=\"1\" transaction=\"2\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"1024\">\n  <def name=\"17\">\n    <range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"64\" time=\"0\"/>\n  </def>\n  <device dev_id=\"1\" mapped_blocks=\"65\" transaction=\"0\" creation_time=\"0\" snap_time=\"1\">\n    <ref name=\"17\"/>\n    <single_mapping origin_block=\"70\" data_block=\"5\" time=\"1\"/>\n  </device>\n</superblock>"
        );
    }

    #[test]
    fn json_is_one_document() {
        let mut w = JsonWriter::new(Vec::new());
        sample(&mut w);
        let s = String::from_utf8(w.w).unwrap();
        assert!(s.starts_with("{\"superblock\":{\"uuid\":\"\",\"time\":1,"));
        assert!(s.contains("\"defs\":[\n{\"name\":\"17\",\"mappings\":[\n{\"origin_begin\":0,\"data_begin\":0,\"length\":64,\"time\":0}]}\n]"));
        assert!(s.contains("{\"ref\":\"17\"}"));
        assert!(s.ends_with("]}\n"));
        // Balanced brackets.
        assert_eq!(s.matches('[').count(), s.matches(']').count());
        assert_eq!(s.matches('{').count(), s.matches('}').count());
    }

    #[test]
    fn runs_merge_only_when_everything_is_consecutive() {
        let mut r = RunBuilder::default();
        assert!(r.push(0, BlockTime { block: 10, time: 0 }).is_none());
        assert!(r.push(1, BlockTime { block: 11, time: 0 }).is_none());
        let m = r.push(2, BlockTime { block: 12, time: 1 }).unwrap();
        assert_eq!(
            m,
            Mapping {
                origin_begin: 0,
                data_begin: 10,
                len: 2,
                time: 0
            }
        );
        let m = r.push(4, BlockTime { block: 13, time: 1 }).unwrap();
        assert_eq!(m.len, 1);
        assert_eq!(r.take().unwrap().origin_begin, 4);
    }
}
