//! The damage corpus: more than a thousand seeded corruptions of the
//! project's own fixtures, each run through the real binary.
//!
//! Fixtures (built fresh by the test, in a tmpfs when there is one):
//! * `kernel-small`: the kernel-written pool in tests/data (with a held
//!   metadata snapshot);
//! * `snap`: a pool restored from XML written here, then
//!   `reserve_metadata_snap`, `create_snap 4 1` and `delete 3` through
//!   thin_message, so the held snapshot's trees differ from the live ones
//!   (device 3 is only in the snapshot);
//! * `two-level`: three devices with 300 to 600 scattered mappings each, so
//!   every device's mapping tree is an internal node over 2 or 3 leaves.
//!
//! Kinds of damage (deterministic: one xorshift seed):
//! * `flip`: one bit of a block, checksum left stale;
//! * `sealed-flip`: one bit of a field some reader interprets, then the
//!   block's checksum re-sealed (library checksum code), so only the
//!   structure and the cross-checks can catch it;
//! * `zero`: a whole block zeroed; `swap`: two blocks exchanged;
//! * `truncate`: the image cut short (block multiples and odd lengths);
//! * `stale`: an old version of a node with a valid checksum: for `snap` and
//!   `two-level` the block at the same location in an image of an earlier
//!   state (before the thin_message calls; a restore of a slightly different
//!   XML, which has the same block layout); for `kernel-small` the held
//!   metadata snapshot's version of a live node, moved to the live node's
//!   location (location field rewritten, re-sealed);
//! * `foreign`: a pointer into another tree: a child pointer (or tree root
//!   in the superblock) rewritten to a valid node of another tree or level
//!   and re-sealed, or another tree's node copied over the block a pointer
//!   points at (location rewritten, re-sealed).
//!
//! Properties, every case, on the real binary:
//! 1. no tool panics, dies on a signal, or exits 2;
//! 2. thin_check fails whenever a block the metadata references (the
//!    superblock, the held snapshot's superblock, every node of every tree
//!    both superblocks reach, the space maps' index and bitmap blocks) was
//!    changed, except the cases excluded below, which are counted;
//! 3. when thin_repair succeeds its output passes thin_check; when it
//!    refuses, the error is one line with exit 65 (or 66/74);
//! 4. every device none of whose mapping-tree blocks (root, internal nodes,
//!    leaves) was damaged comes out of thin_repair with exactly its
//!    mappings, provided the way to its root survives: the superblock
//!    (block 0) and the live top-level and details trees. When one of those
//!    is hit, a device's root can only be found among older top-level nodes
//!    that are just as valid (freed by later transactions, still on disk, or
//!    the held snapshot's), which nothing on disk tells apart from the
//!    current one, so exactness is not asserted then (properties 3 and 5
//!    still are);
//! 5. thin_dump --repair prints no mapping (device, block, data block, time)
//!    that the original metadata (live or held snapshot) did not hold.
//!
//! Exclusions from property 2 (no requirement that thin_check fails; the
//! summary counts them), each because the damaged metadata is a valid pool
//! or reads identically:
//! * no-op: the bytes did not change; or only bytes nobody reads changed
//!   (the 4 pad bytes of a node header, key/value slots at or past
//!   nr_entries, the unused word of a bitmap or index header, bitmap entries
//!   past the space map's nr_blocks, index entries past its bitmaps, the
//!   held snapshot superblock's fields other than its two tree roots, which
//!   the kernel zeroes or never reads); or an
//!   internal node's key changed to a value that still separates its
//!   neighbouring subtrees (every lookup resolves as before);
//! * semantic: a re-sealed change to a value with no cross-check: a mapping
//!   moved to another virtual block keeping key order and its parent's key
//!   range, a mapping's time changed to one not after the pool's time,
//!   a device's transaction id, creation or snapshot time, an index entry's
//!   `none_free_before` (a search hint the kernel only uses as a start);
//! * valid-earlier-state (stale): the stale source differs from the current
//!   metadata only by two mappings of one leaf exchanging their data blocks,
//!   or by one mapping's time: the old leaf, with a valid checksum at the
//!   right place, references exactly the blocks the space maps count, in the
//!   same key range, so it is a valid pool and no checker can know it is
//!   not the latest. Likewise an old superblock copied over block 0 when
//!   every block its state references is still on disk unchanged (the last
//!   transaction wrote only new blocks, as copy-on-write commits do): that
//!   is the earlier pool, whole. For the leaf cases the strongest property
//!   holds and is asserted: thin_dump --repair prints only mappings of the
//!   current or of that earlier state.
//!
//! Relaxation of property 5 (documented in README.md's Safety section):
//! when the superblock or the details or top-level trees are hit, repair
//! falls back to the held snapshot or a scan, which can find older nodes
//! with valid checksums (freed by later transactions); and a node with a
//! valid checksum and consistent keys reached by a wrong pointer
//! (`foreign`, `stale`) or a re-sealed leaf entry cannot be told from the
//! right one without recounting every reference, which thin_dump --repair
//! (one pass over the trees) does not do. In those cases the asserted
//! property is that thin_dump --repair invents nothing: every mapping it
//! prints is an entry of a valid leaf on the device, as it was or as damaged
//! (a time after the pool's printed as 0, as repair resets it).
//!
//! Library fixes this corpus drove (each with its own test in
//! tests/repair_recovery.rs): salvage reads each device's tree on its own
//! (a pointer into another device's tree took that device's leaves away);
//! a time after the surviving superblock's pool time is damage (thin_repair
//! copied it and its output failed thin_check); salvage drops a leaf whose
//! max_entries no writer gives its value size (its values were read from
//! the wrong place).
//!
//! `DAMAGE_THREADS` (default 2) sets the number of worker threads.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use common::*;
use thinmeta::pdata::btree::Node;
use thinmeta::pdata::checksum::{self, BlockKind};
use thinmeta::pdata::space_map::SmRoot;
use thinmeta::pdata::{le32, le64};
use thinmeta::thin::superblock::Superblock;

const BS: usize = 4096;
const SEED: u64 = 0x7468_696e_6d65_7461; // "thinmeta"

// ---------------------------------------------------------------- rng

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next() % n
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

// ---------------------------------------------------------------- fixtures

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Tree {
    Details,
    Top,
    Mapping(u64),
    RefCount,
    DataIndex,
}

impl Tree {
    fn value_size(self) -> usize {
        match self {
            Tree::Details => 24,
            Tree::Top | Tree::Mapping(_) => 8,
            Tree::RefCount => 4,
            Tree::DataIndex => 16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Superblock,
    Node {
        tree: Tree,
        leaf: bool,
        /// Keys of this subtree must lie in [lo, hi) (from the parent).
        lo: u64,
        hi: Option<u64>,
    },
    MetaIndex {
        nr_bitmaps: u64,
    },
    Bitmap {
        /// First block this bitmap counts, and the space map's size.
        first: u64,
        sm_blocks: u64,
    },
}

type Mapping = (u64, u64, u32); // virtual block, data block, time
type DevMaps = BTreeMap<u64, BTreeSet<Mapping>>;

struct Fixture {
    name: &'static str,
    image: Vec<u8>,
    /// Every block the metadata references, with what it is.
    roles: BTreeMap<u64, Vec<Role>>,
    /// Each device's live mapping-tree blocks.
    dev_blocks: BTreeMap<u64, BTreeSet<u64>>,
    /// Blocks of the details and top-level trees' paths, and the superblock.
    /// (A device whose entry is lost can only be found by a scan.)
    top_blocks: BTreeSet<u64>,
    details_blocks: BTreeSet<u64>,
    /// thin_dump of the original: live mappings, and live ∪ held snapshot.
    live: DevMaps,
    allowed: DevMaps,
    /// Every entry of every valid 8-byte-value leaf on the device, referenced
    /// or not (older nodes a scan can find), read as a mapping.
    disk: BTreeSet<Mapping>,
    /// The superblocks and the live and held details and top-level trees.
    index_blocks: BTreeSet<u64>,
    sb_time: u32,
    /// Earlier states: (label, image, valid-earlier-state, their mappings).
    stale: Vec<StaleSource>,
    /// kernel-small: (old node location, live node location) pairs.
    moved_stale: Vec<(u64, u64)>,
}

struct StaleSource {
    label: &'static str,
    image: Vec<u8>,
    undetectable: bool,
    maps: BTreeSet<Mapping>,
}

fn block(img: &[u8], b: u64) -> &[u8] {
    &img[b as usize * BS..(b as usize + 1) * BS]
}

/// Walk a btree of the original image (which must be valid), recording roles.
/// Returns the (min, max) key of the subtree.
#[allow(clippy::too_many_arguments)]
fn walk(
    img: &[u8],
    b: u64,
    tree: Tree,
    lo: u64,
    hi: Option<u64>,
    roles: &mut BTreeMap<u64, Vec<Role>>,
    blocks: &mut BTreeSet<u64>,
    leaf_entries: &mut Vec<(u64, Vec<u8>)>,
) -> Option<(u64, u64)> {
    let node = Node::parse(b, block(img, b), tree.value_size())
        .unwrap_or_else(|e| panic!("fixture node {b}: {e}"));
    let role = Role::Node {
        tree,
        leaf: node.is_leaf(),
        lo,
        hi,
    };
    let r = roles.entry(b).or_default();
    if !r.contains(&role) {
        r.push(role);
    }
    blocks.insert(b);
    let n = node.nr_entries();
    if n == 0 {
        return None;
    }
    if node.is_leaf() {
        for i in 0..n {
            leaf_entries.push((node.key(i), node.value_bytes(i).to_vec()));
        }
        return Some((node.key(0), node.key(n - 1)));
    }
    let mut range: Option<(u64, u64)> = None;
    for i in 0..n {
        let clo = node.key(i);
        let chi = if i + 1 < n { Some(node.key(i + 1)) } else { hi };
        if let Some((a, z)) = walk(
            img,
            node.child(i),
            tree,
            clo,
            chi,
            roles,
            blocks,
            leaf_entries,
        ) {
            range = Some(match range {
                None => (a, z),
                Some((a0, _)) => (a0, z),
            });
        }
    }
    range
}

/// Roles of everything the superblock(s) reference; also each device's live
/// mapping-tree blocks and the details/top-level blocks.
#[allow(clippy::type_complexity)]
fn analyse(
    img: &[u8],
) -> (
    BTreeMap<u64, Vec<Role>>,
    BTreeMap<u64, BTreeSet<u64>>,
    BTreeSet<u64>,
    BTreeSet<u64>,
    u32,
) {
    let sb = Superblock::parse(0, block(img, 0)).unwrap();
    let mut roles: BTreeMap<u64, Vec<Role>> = BTreeMap::new();
    let mut dev_blocks = BTreeMap::new();
    let mut top_blocks = BTreeSet::new();
    let mut details_blocks = BTreeSet::new();
    roles.entry(0).or_default().push(Role::Superblock);
    let mut supers = vec![(sb.details_root, sb.mapping_root, true)];
    if sb.metadata_snap != 0 {
        let held = Superblock::parse(sb.metadata_snap, block(img, sb.metadata_snap)).unwrap();
        roles
            .entry(sb.metadata_snap)
            .or_default()
            .push(Role::Superblock);
        supers.push((held.details_root, held.mapping_root, false));
    }
    for (details, top, live) in supers {
        let mut blocks = BTreeSet::new();
        let mut e = Vec::new();
        walk(
            img,
            details,
            Tree::Details,
            0,
            None,
            &mut roles,
            &mut blocks,
            &mut e,
        );
        if live {
            details_blocks = blocks;
        }
        let mut blocks = BTreeSet::new();
        let mut e = Vec::new();
        walk(
            img,
            top,
            Tree::Top,
            0,
            None,
            &mut roles,
            &mut blocks,
            &mut e,
        );
        if live {
            top_blocks = blocks;
        }
        for (dev, v) in e {
            let root = le64(&v, 0);
            let mut blocks = BTreeSet::new();
            let mut e = Vec::new();
            walk(
                img,
                root,
                Tree::Mapping(dev),
                0,
                None,
                &mut roles,
                &mut blocks,
                &mut e,
            );
            if live {
                dev_blocks.insert(dev, blocks);
            }
        }
    }
    // Space maps: metadata (one index block), data (index btree).
    let msm = SmRoot::parse(&sb.metadata_sm_root);
    let dsm = SmRoot::parse(&sb.data_sm_root);
    let per = thinmeta::pdata::space_map::ENTRIES_PER_BITMAP;
    let idx = block(img, msm.bitmap_root);
    assert_eq!(checksum::identify(idx), Some(BlockKind::MetadataIndex));
    roles
        .entry(msm.bitmap_root)
        .or_default()
        .push(Role::MetaIndex {
            nr_bitmaps: msm.nr_bitmaps(),
        });
    for i in 0..msm.nr_bitmaps() {
        let bm = le64(idx, 16 + 16 * i as usize);
        roles.entry(bm).or_default().push(Role::Bitmap {
            first: i * per,
            sm_blocks: msm.nr_blocks,
        });
    }
    let mut scratch = BTreeSet::new();
    for (root, tree) in [
        (msm.ref_count_root, Tree::RefCount),
        (dsm.ref_count_root, Tree::RefCount),
    ] {
        let mut e = Vec::new();
        walk(img, root, tree, 0, None, &mut roles, &mut scratch, &mut e);
    }
    let mut e = Vec::new();
    walk(
        img,
        dsm.bitmap_root,
        Tree::DataIndex,
        0,
        None,
        &mut roles,
        &mut scratch,
        &mut e,
    );
    for (i, v) in e {
        roles.entry(le64(&v, 0)).or_default().push(Role::Bitmap {
            first: i * per,
            sm_blocks: dsm.nr_blocks,
        });
    }
    // The oracle must agree with the space map the kernel/restore wrote.
    assert_eq!(
        roles.len() as u64,
        msm.nr_allocated,
        "referenced blocks vs the metadata space map's allocated count"
    );
    (roles, dev_blocks, top_blocks, details_blocks, sb.time)
}

fn run_tool(tool: &str, args: &[&str]) -> Output {
    Command::new(bin())
        .arg(tool)
        .args(args)
        .output()
        .expect("run thinmeta")
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn attr(line: &str, key: &str) -> Option<u64> {
    let pat = format!(" {key}=\"");
    let s = line.find(&pat)? + pat.len();
    let e = line[s..].find('"')? + s;
    line[s..e].parse().ok()
}

/// Every mapping of an XML dump, expanded, per device.
fn parse_dump(xml: &str) -> DevMaps {
    let mut out: DevMaps = BTreeMap::new();
    let mut defs: BTreeMap<String, Vec<Mapping>> = BTreeMap::new();
    let mut cur: Vec<Mapping> = Vec::new();
    let mut def: Option<String> = None;
    let mut dev: Option<u64> = None;
    for l in xml.lines().map(str::trim) {
        if l.starts_with("<def ") {
            let s = l.find("name=\"").unwrap() + 6;
            let e = l[s..].find('"').unwrap() + s;
            def = Some(l[s..e].to_string());
            cur.clear();
        } else if l.starts_with("</def") {
            defs.insert(def.take().unwrap(), std::mem::take(&mut cur));
        } else if l.starts_with("<device ") {
            dev = attr(l, "dev_id");
            out.entry(dev.unwrap()).or_default();
        } else if l.starts_with("</device") {
            let d = dev.take().unwrap();
            out.get_mut(&d).unwrap().extend(cur.drain(..));
        } else if l.starts_with("<ref ") {
            let s = l.find("name=\"").unwrap() + 6;
            let e = l[s..].find('"').unwrap() + s;
            cur.extend(defs[&l[s..e]].iter().copied());
        } else if l.starts_with("<single_mapping") {
            cur.push((
                attr(l, "origin_block").unwrap(),
                attr(l, "data_block").unwrap(),
                attr(l, "time").unwrap() as u32,
            ));
        } else if l.starts_with("<range_mapping") {
            let (o, d, n) = (
                attr(l, "origin_begin").unwrap(),
                attr(l, "data_begin").unwrap(),
                attr(l, "length").unwrap(),
            );
            let t = attr(l, "time").unwrap() as u32;
            cur.extend((0..n).map(|i| (o + i, d + i, t)));
        }
    }
    out
}

/// The entries of `data` (block `b`) read as mappings when it is a valid
/// leaf with 8-byte values; times after the pool's also as time 0 (repair
/// resets them so).
fn leaf_mappings(data: &[u8], b: u64, pool_time: u32, out: &mut BTreeSet<Mapping>) {
    if let Ok(n) = Node::parse(b, data, 8) {
        if n.is_leaf() && n.value_size() == 8 {
            for i in 0..n.nr_entries() {
                let v = BlockTimeV(le64(n.value_bytes(i), 0));
                out.insert((n.key(i), v.block(), v.time()));
                if v.time() > pool_time {
                    out.insert((n.key(i), v.block(), 0));
                }
            }
        }
    }
}

fn write_file(p: &Path, bytes: &[u8]) {
    std::fs::write(p, bytes).unwrap();
}

fn zero_file(p: &Path, len: u64) {
    let f = std::fs::File::create(p).unwrap();
    f.set_len(len).unwrap();
}

struct XmlDev {
    id: u64,
    creation: u32,
    snap: u32,
    maps: Vec<Mapping>,
}

fn xml(time: u32, trans: u64, nr_data: u64, devs: &[XmlDev]) -> String {
    let mut s = format!(
        "<superblock uuid=\"\" time=\"{time}\" transaction=\"{trans}\" version=\"2\" data_block_size=\"128\" nr_data_blocks=\"{nr_data}\">\n"
    );
    for d in devs {
        s += &format!(
            "  <device dev_id=\"{}\" mapped_blocks=\"{}\" transaction=\"0\" creation_time=\"{}\" snap_time=\"{}\">\n",
            d.id,
            d.maps.len(),
            d.creation,
            d.snap
        );
        for (v, b, t) in &d.maps {
            s += &format!(
                "    <single_mapping origin_block=\"{v}\" data_block=\"{b}\" time=\"{t}\"/>\n"
            );
        }
        s += "  </device>\n";
    }
    s += "</superblock>\n";
    s
}

fn restore(dir: &Path, name: &str, xml_text: &str, blocks: u64) -> PathBuf {
    let x = dir.join(format!("{name}.xml"));
    std::fs::write(&x, xml_text).unwrap();
    let img = dir.join(format!("{name}.img"));
    zero_file(&img, blocks * BS as u64);
    ok(
        &run_tool(
            "thin_restore",
            &["-i", x.to_str().unwrap(), "-o", img.to_str().unwrap()],
        ),
        "thin_restore",
    );
    img
}

fn message(img: &Path, words: &[&str]) {
    let mut args = vec![img.to_str().unwrap()];
    args.extend_from_slice(words);
    ok(&run_tool("thin_message", &args), "thin_message");
}

fn dump_maps(img: &Path, extra: &[&str]) -> DevMaps {
    let mut args = extra.to_vec();
    args.push(img.to_str().unwrap());
    parse_dump(&ok(&run_tool("thin_dump", &args), "thin_dump"))
}

fn finish(
    name: &'static str,
    img_path: &Path,
    stale: Vec<StaleSource>,
    moved_stale: Vec<(u64, u64)>,
) -> Fixture {
    let out = run_tool("thin_check", &[img_path.to_str().unwrap()]);
    ok(&out, &format!("{name}: original passes thin_check"));
    let image = std::fs::read(img_path).unwrap();
    let (roles, dev_blocks, top_blocks, details_blocks, sb_time) = analyse(&image);
    let live = dump_maps(img_path, &[]);
    let mut allowed = live.clone();
    let sb = Superblock::parse(0, block(&image, 0)).unwrap();
    if sb.metadata_snap != 0 {
        for (d, m) in dump_maps(img_path, &["-m"]) {
            allowed.entry(d).or_default().extend(m);
        }
    }
    let mut disk = BTreeSet::new();
    for b in 0..(image.len() / BS) as u64 {
        leaf_mappings(block(&image, b), b, sb.time, &mut disk);
    }
    let index_blocks = roles
        .iter()
        .filter(|(_, r)| {
            r.iter().any(|r| {
                matches!(
                    r,
                    Role::Superblock
                        | Role::Node {
                            tree: Tree::Details | Tree::Top,
                            ..
                        }
                )
            })
        })
        .map(|(b, _)| *b)
        .collect();
    Fixture {
        disk,
        index_blocks,
        name,
        image,
        roles,
        dev_blocks,
        top_blocks,
        details_blocks,
        live,
        allowed,
        sb_time,
        stale,
        moved_stale,
    }
}

fn kernel_small(dir: &Path) -> Fixture {
    let p = unpack(&fixture_dir().join("meta.img.gz"), dir, "kernel-small.img");
    let img = std::fs::read(&p).unwrap();
    // Live nodes whose held-snapshot version lives elsewhere: pair each live
    // node with the held node at the same place in the same tree.
    let sb = Superblock::parse(0, block(&img, 0)).unwrap();
    let held = Superblock::parse(sb.metadata_snap, block(&img, sb.metadata_snap)).unwrap();
    let mut moved = vec![];
    if held.details_root != sb.details_root {
        moved.push((held.details_root, sb.details_root));
    }
    if held.mapping_root != sb.mapping_root {
        moved.push((held.mapping_root, sb.mapping_root));
    }
    let roots = |top: u64| -> BTreeMap<u64, u64> {
        let n = Node::parse(top, block(&img, top), 8).unwrap();
        n.entries::<u64>().collect()
    };
    let (live_roots, held_roots) = (roots(sb.mapping_root), roots(held.mapping_root));
    for (dev, r) in &live_roots {
        if let Some(h) = held_roots.get(dev) {
            if h != r {
                moved.push((*h, *r));
            }
        }
    }
    assert!(!moved.is_empty(), "kernel-small has held nodes that differ");
    finish("kernel-small", &p, vec![], moved)
}

/// Every mapping (any device, live or held) of an earlier state's image.
fn state_maps(dir: &Path, name: &str, bytes: &[u8]) -> BTreeSet<Mapping> {
    let p = dir.join(format!("{name}.img"));
    write_file(&p, bytes);
    let mut out: BTreeSet<Mapping> = dump_maps(&p, &[]).into_values().flatten().collect();
    let held = run_tool("thin_dump", &["-m", p.to_str().unwrap()]);
    if held.status.success() {
        out.extend(
            parse_dump(&String::from_utf8_lossy(&held.stdout))
                .into_values()
                .flatten(),
        );
    }
    out
}

fn snap_pool(dir: &Path) -> Fixture {
    let d1: Vec<Mapping> = (0..150).map(|i| (2 * i, 100 + i, 0)).collect();
    let mut d2: Vec<Mapping> = d1[..100].to_vec();
    d2.extend((100..150).map(|i| (2 * i, 300 + i, 1)));
    let d3: Vec<Mapping> = (0..60).map(|i| (7 * i, 600 + (i * 13) % 60, 1)).collect();
    let devs = [
        XmlDev {
            id: 1,
            creation: 0,
            snap: 1,
            maps: d1,
        },
        XmlDev {
            id: 2,
            creation: 1,
            snap: 1,
            maps: d2,
        },
        XmlDev {
            id: 3,
            creation: 1,
            snap: 1,
            maps: d3,
        },
    ];
    let p = restore(dir, "snap", &xml(1, 3, 1024, &devs), 512);
    let restored = std::fs::read(&p).unwrap();
    message(&p, &["reserve_metadata_snap"]);
    let reserved = std::fs::read(&p).unwrap();
    message(&p, &["create_snap", "4", "1"]);
    let created = std::fs::read(&p).unwrap();
    message(&p, &["delete", "3"]);
    let (m_restored, m_reserved, m_created) = (
        state_maps(dir, "snap-restored", &restored),
        state_maps(dir, "snap-reserved", &reserved),
        state_maps(dir, "snap-created", &created),
    );
    finish(
        "snap",
        &p,
        vec![
            StaleSource {
                label: "restored",
                image: restored,
                undetectable: false,
                maps: m_restored,
            },
            StaleSource {
                label: "reserved",
                image: reserved,
                undetectable: false,
                maps: m_reserved,
            },
            StaleSource {
                label: "snapshot created",
                image: created,
                undetectable: false,
                maps: m_created,
            },
        ],
        vec![],
    )
}

fn two_level_devs(variant: u32) -> Vec<XmlDev> {
    let mut d1: Vec<Mapping> = (0..600).map(|i| (2 * i, (i * 7 + 3) % 2048, 0)).collect();
    let mut d2: Vec<Mapping> = d1[..200]
        .iter()
        .copied()
        .chain((200..400).map(|i| (2 * i, 2048 + i, 1)))
        .collect();
    let mut d3: Vec<Mapping> = (0..300)
        .map(|i| (5 * i, 2600 + (i * 11) % 300, 1))
        .collect();
    match variant {
        0 => {}
        // Data blocks of two mappings moved to blocks nothing else uses.
        1 => {
            d1[5].1 = 3500;
            d1[300].1 = 3501;
            d2[350].1 = 3502;
        }
        // Two mappings of one leaf exchange their data blocks.
        2 => {
            let (a, b) = (d1[10].1, d1[11].1);
            d1[10].1 = b;
            d1[11].1 = a;
        }
        // One mapping's time.
        3 => d2[250].2 = 0,
        // One mapping of every leaf moved to a block nothing else uses.
        4 => {
            let moved = [
                (0usize, 100usize),
                (0, 400),
                (1, 100),
                (1, 300),
                (2, 50),
                (2, 250),
            ];
            for (n, (k, i)) in moved.into_iter().enumerate() {
                let d = match k {
                    0 => &mut d1,
                    1 => &mut d2,
                    _ => &mut d3,
                };
                d[i].1 = 3600 + 10 * n as u64;
            }
        }
        _ => unreachable!(),
    }
    vec![
        XmlDev {
            id: 1,
            creation: 0,
            snap: 1,
            maps: d1,
        },
        XmlDev {
            id: 2,
            creation: 1,
            snap: 1,
            maps: d2,
        },
        XmlDev {
            id: 3,
            creation: 1,
            snap: 0,
            maps: d3,
        },
    ]
}

fn two_level(dir: &Path) -> Fixture {
    let p = restore(dir, "two-level", &xml(1, 7, 4096, &two_level_devs(0)), 512);
    let mut stale = vec![];
    for (variant, label, undetectable) in [
        (1, "other data blocks", false),
        (2, "two data blocks exchanged", true),
        (3, "one time changed", true),
        (4, "a mapping of every leaf elsewhere", false),
    ] {
        let devs = two_level_devs(variant);
        let q = restore(
            dir,
            &format!("two-level-v{variant}"),
            &xml(1, 7, 4096, &devs),
            512,
        );
        let maps = devs
            .iter()
            .flat_map(|d| d.maps.iter().copied())
            .collect::<BTreeSet<_>>();
        stale.push(StaleSource {
            label,
            image: std::fs::read(&q).unwrap(),
            undetectable,
            maps,
        });
    }
    let f = finish("two-level", &p, stale, vec![]);
    for (dev, blocks) in &f.dev_blocks {
        let leaves = blocks
            .iter()
            .filter(|b| {
                f.roles[b]
                    .iter()
                    .any(|r| matches!(r, Role::Node { leaf: true, .. }))
            })
            .count();
        assert!(
            blocks.len() > leaves && leaves >= 2,
            "device {dev}'s tree has 2 levels"
        );
    }
    f
}

// ---------------------------------------------------------------- cases

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Flip,
    SealedFlip,
    Zero,
    Swap,
    Truncate,
    Stale,
    Foreign,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    /// thin_check must fail.
    Flag,
    /// Excluded from property 2, with the reason (counted).
    NoOp(&'static str),
    Semantic(&'static str),
    EarlierState,
    /// Nothing the metadata references changed.
    Unreferenced,
}

struct Case {
    fixture: usize,
    kind: Kind,
    what: String,
    /// Patches: (block, new contents); or a truncation length.
    patches: Vec<(u64, Vec<u8>)>,
    truncate: Option<u64>,
    expect: Expect,
    /// Extra mappings thin_dump --repair may print (any device).
    extra: BTreeSet<Mapping>,
    /// thin_dump --repair may print any valid leaf's entry (see run_case).
    relaxed: bool,
}

fn referenced(f: &Fixture, b: u64) -> bool {
    f.roles.contains_key(&b)
}

fn node_role(f: &Fixture, b: u64) -> Option<(Tree, bool, u64, Option<u64>)> {
    f.roles[&b].iter().find_map(|r| match *r {
        Role::Node { tree, leaf, lo, hi } => Some((tree, leaf, lo, hi)),
        _ => None,
    })
}

fn btree_blocks(f: &Fixture) -> Vec<u64> {
    f.roles
        .iter()
        .filter(|(_, r)| r.iter().any(|r| matches!(r, Role::Node { .. })))
        .map(|(b, _)| *b)
        .collect()
}

/// Subtree (min, max) leaf key of the node at `b` in the original.
fn subtree_range(f: &Fixture, b: u64, tree: Tree) -> Option<(u64, u64)> {
    let mut roles = BTreeMap::new();
    let mut blocks = BTreeSet::new();
    let mut e = Vec::new();
    walk(&f.image, b, tree, 0, None, &mut roles, &mut blocks, &mut e)
}

/// Decide what a re-sealed one-bit change at byte `off`, bit `bit` of the
/// referenced block `b` must do (see the module comment).
fn classify_sealed(f: &Fixture, b: u64, off: usize, bit: u32) -> (Expect, BTreeSet<Mapping>) {
    let orig = block(&f.image, b);
    let mut new = orig.to_vec();
    new[off] ^= 1 << bit;
    let none = BTreeSet::new();
    let role = f.roles[&b][0];
    match role {
        // The held snapshot's copy: only its two tree roots are read (the
        // kernel zeroes its space map roots; its own held root is unused).
        Role::Superblock if b != 0 && !(320..336).contains(&off) => {
            (Expect::NoOp("held superblock field nobody reads"), none)
        }
        Role::Superblock => (Expect::Flag, none),
        Role::MetaIndex { nr_bitmaps } => match off {
            4..=7 => (Expect::NoOp("index header pad"), none),
            8..=15 => (Expect::Flag, none),
            _ => {
                let i = (off - 16) / 16;
                if i as u64 >= nr_bitmaps {
                    (Expect::NoOp("index entry past the bitmaps"), none)
                } else if (off - 16) % 16 >= 12 {
                    (Expect::Semantic("none_free_before hint"), none)
                } else {
                    (Expect::Flag, none)
                }
            }
        },
        Role::Bitmap { first, sm_blocks } => match off {
            4..=7 => (Expect::NoOp("bitmap header pad"), none),
            8..=15 => (Expect::Flag, none),
            _ => {
                let entry = first + ((off - 16) * 4) as u64 + (bit / 2) as u64;
                if entry >= sm_blocks {
                    (Expect::NoOp("bitmap entry past nr_blocks"), none)
                } else {
                    (Expect::Flag, none)
                }
            }
        },
        Role::Node { tree, leaf, lo, hi } => {
            let vs = if leaf { tree.value_size() } else { 8 };
            let nr = le32(orig, 16) as usize;
            let max = le32(orig, 20) as usize;
            if off < 28 {
                return (Expect::Flag, none);
            }
            if off < 32 {
                return (Expect::NoOp("node header pad"), none);
            }
            let key_end = 32 + 8 * max;
            if off < key_end {
                let i = (off - 32) / 8;
                if i >= nr {
                    return (Expect::NoOp("key slot past nr_entries"), none);
                }
                let nk = le64(&new, 32 + 8 * i);
                let prev = (i > 0).then(|| le64(orig, 32 + 8 * (i - 1)));
                let next = (i + 1 < nr).then(|| le64(orig, 32 + 8 * (i + 1)));
                let ordered = prev.map_or(true, |p| p < nk) && next.map_or(true, |n| nk < n);
                if !leaf {
                    // Still separates the subtrees on either side?
                    let here = subtree_range(f, le64(orig, key_end + 8 * i), tree);
                    let before = (i > 0)
                        .then(|| subtree_range(f, le64(orig, key_end + 8 * (i - 1)), tree))
                        .flatten();
                    let lo_ok = before.map_or(true, |(_, z)| z < nk);
                    let hi_ok = here.map_or(true, |(a, _)| nk <= a);
                    if ordered && lo_ok && hi_ok {
                        return (Expect::NoOp("internal key still separates"), none);
                    }
                    return (Expect::Flag, none);
                }
                if let Tree::Mapping(_) = tree {
                    let in_range = lo <= nk && hi.map_or(true, |h| nk < h);
                    if ordered && in_range {
                        let v = BlockTimeV(le64(orig, key_end + 8 * i));
                        let extra = [(nk, v.block(), v.time())].into_iter().collect();
                        return (Expect::Semantic("mapping moved in order"), extra);
                    }
                }
                return (Expect::Flag, none);
            }
            let vend = key_end + vs * max;
            if off >= vend {
                return (Expect::NoOp("past the value area"), none);
            }
            let i = (off - key_end) / vs;
            let within = (off - key_end) % vs;
            if i >= nr {
                return (Expect::NoOp("value slot past nr_entries"), none);
            }
            if !leaf {
                return (Expect::Flag, none);
            }
            match tree {
                Tree::Mapping(_) => {
                    let v = BlockTimeV(le64(&new, key_end + 8 * i));
                    let k = le64(orig, 32 + 8 * i);
                    let extra: BTreeSet<Mapping> = [(k, v.block(), v.time()), (k, v.block(), 0)]
                        .into_iter()
                        .collect();
                    if within < 3 {
                        // The 24-bit time.
                        if v.time() > f.sb_time {
                            (Expect::Flag, extra)
                        } else {
                            (Expect::Semantic("mapping time not after the pool's"), extra)
                        }
                    } else {
                        (Expect::Flag, extra)
                    }
                }
                Tree::Details => {
                    if within < 8 {
                        (Expect::Flag, none)
                    } else {
                        (Expect::Semantic("device transaction id or times"), none)
                    }
                }
                Tree::DataIndex if within >= 12 => {
                    (Expect::Semantic("none_free_before hint"), none)
                }
                _ => (Expect::Flag, none),
            }
        }
    }
}

struct BlockTimeV(u64);
impl BlockTimeV {
    fn block(&self) -> u64 {
        self.0 >> 24
    }
    fn time(&self) -> u32 {
        (self.0 & 0xff_ffff) as u32
    }
}

fn reseal(b: &mut [u8], kind: BlockKind) {
    checksum::seal(b, kind);
}

fn kind_of(f: &Fixture, b: u64) -> BlockKind {
    checksum::identify(block(&f.image, b)).expect("referenced blocks carry checksums")
}

fn expect_for_damage(f: &Fixture, blocks: &[u64]) -> Expect {
    if blocks.iter().any(|b| referenced(f, *b)) {
        Expect::Flag
    } else {
        Expect::Unreferenced
    }
}

fn gen_cases(fixtures: &[Fixture], rng: &mut Rng) -> Vec<Case> {
    let mut cases = vec![];
    for (fi, f) in fixtures.iter().enumerate() {
        let nr_blocks = (f.image.len() / BS) as u64;
        let refs: Vec<u64> = f.roles.keys().copied().collect();
        let nodes = btree_blocks(f);
        let mut case = |kind: Kind,
                        what: String,
                        patches: Vec<(u64, Vec<u8>)>,
                        truncate: Option<u64>,
                        expect: Expect,
                        extra: BTreeSet<Mapping>,
                        relaxed: bool| {
            cases.push(Case {
                fixture: fi,
                kind,
                what: format!("{}: {what}", f.name),
                patches,
                truncate,
                expect,
                extra,
                relaxed,
            })
        };
        let pick_block = |rng: &mut Rng| -> u64 {
            if rng.chance(85) {
                *rng.pick(&refs)
            } else {
                rng.below(nr_blocks)
            }
        };

        // Bit flips, checksum left as it was.
        for _ in 0..70 {
            let b = pick_block(rng);
            let off = rng.below(BS as u64) as usize;
            let bit = rng.below(8) as u32;
            let mut nb = block(&f.image, b).to_vec();
            nb[off] ^= 1 << bit;
            let e = expect_for_damage(f, &[b]);
            case(
                Kind::Flip,
                format!("flip block {b} byte {off} bit {bit}"),
                vec![(b, nb)],
                None,
                e,
                BTreeSet::new(),
                false,
            );
        }

        // Re-sealed flips of fields readers interpret.
        for _ in 0..130 {
            let b = *rng.pick(&refs);
            let orig = block(&f.image, b);
            let off = match f.roles[&b][0] {
                Role::Superblock => {
                    // Tree roots, the held root, the space map roots' counters and roots.
                    let fields: &[(usize, usize)] =
                        &[(56, 8), (72, 24), (200, 24), (320, 8), (328, 8)];
                    let (s, n) = *rng.pick(fields);
                    s + rng.below(n as u64) as usize
                }
                Role::MetaIndex { nr_bitmaps } => 16 + rng.below(16 * nr_bitmaps + 8) as usize,
                Role::Bitmap { .. } => 8 + rng.below(512) as usize,
                Role::Node { tree, leaf, .. } => {
                    let nr = le32(orig, 16) as usize;
                    let max = le32(orig, 20) as usize;
                    let vs = if leaf { tree.value_size() } else { 8 };
                    match rng.below(10) {
                        0 | 1 => 4 + rng.below(28) as usize,
                        2..=5 => 32 + rng.below(8 * nr.max(1) as u64) as usize,
                        _ => 32 + 8 * max + rng.below((vs * nr.max(1)) as u64) as usize,
                    }
                }
            };
            let bit = rng.below(8) as u32;
            let mut nb = orig.to_vec();
            nb[off] ^= 1 << bit;
            reseal(&mut nb, kind_of(f, b));
            let (e, extra) = classify_sealed(f, b, off, bit);
            let relaxed = !extra.is_empty();
            case(
                Kind::SealedFlip,
                format!("sealed flip block {b} byte {off} bit {bit}"),
                vec![(b, nb)],
                None,
                e,
                extra,
                relaxed,
            );
        }

        // Zeroed blocks.
        for _ in 0..45 {
            let b = pick_block(rng);
            let e = if block(&f.image, b).iter().all(|&x| x == 0) {
                Expect::NoOp("block already zero")
            } else {
                expect_for_damage(f, &[b])
            };
            case(
                Kind::Zero,
                format!("zero block {b}"),
                vec![(b, vec![0; BS])],
                None,
                e,
                BTreeSet::new(),
                false,
            );
        }

        // Swapped blocks.
        for _ in 0..40 {
            let a = *rng.pick(&refs);
            let b = pick_block(rng);
            if a == b {
                continue;
            }
            let (ba, bb) = (block(&f.image, a).to_vec(), block(&f.image, b).to_vec());
            let e = if ba == bb {
                Expect::NoOp("identical blocks")
            } else {
                expect_for_damage(f, &[a, b])
            };
            case(
                Kind::Swap,
                format!("swap blocks {a} and {b}"),
                vec![(a, bb), (b, ba)],
                None,
                e,
                BTreeSet::new(),
                false,
            );
        }

        // Truncation.
        let last_ref = *refs.last().unwrap();
        for i in 0..16 {
            let len = if i % 4 == 3 {
                rng.below(nr_blocks * BS as u64)
            } else {
                rng.below(last_ref + 2) * BS as u64
            };
            let first_lost = len / BS as u64;
            let lost: Vec<u64> = (first_lost..nr_blocks).collect();
            let e = expect_for_damage(f, &lost);
            case(
                Kind::Truncate,
                format!("truncate to {len} bytes"),
                vec![],
                Some(len),
                e,
                BTreeSet::new(),
                false,
            );
        }

        // Stale nodes at the same location (every candidate).
        for s in &f.stale {
            for b in 0..nr_blocks {
                let old = block(&s.image, b);
                let cur = block(&f.image, b);
                if old == cur || checksum::identify(old).is_none() || le64(old, 8) != b {
                    continue;
                }
                // An old superblock whose whole state is still on disk
                // unchanged (the last transaction wrote only new blocks) is
                // that earlier pool, valid in every respect.
                let rollback = b == 0 && {
                    let (old_roles, ..) = analyse(&s.image);
                    old_roles
                        .keys()
                        .all(|&x| x == 0 || block(&s.image, x) == block(&f.image, x))
                };
                let e = if !referenced(f, b) {
                    Expect::Unreferenced
                } else if s.undetectable || rollback {
                    Expect::EarlierState
                } else {
                    Expect::Flag
                };
                case(
                    Kind::Stale,
                    format!("stale block {b} from '{}'", s.label),
                    vec![(b, old.to_vec())],
                    None,
                    e,
                    s.maps.clone(),
                    !s.undetectable,
                );
            }
        }
        // Stale nodes moved to the live node's location.
        for &(old, live) in &f.moved_stale {
            let mut nb = block(&f.image, old).to_vec();
            nb[8..16].copy_from_slice(&live.to_le_bytes());
            reseal(&mut nb, BlockKind::BTreeNode);
            case(
                Kind::Stale,
                format!("held node {old} over live node {live}"),
                vec![(live, nb)],
                None,
                Expect::Flag,
                BTreeSet::new(),
                true,
            );
        }

        // Pointers to other trees.
        let slots = pointer_slots(f);
        for _ in 0..60 {
            let &(b, off) = rng.pick(&slots);
            let cur_target = le64(block(&f.image, b), off);
            let mut donor = *rng.pick(&nodes);
            for _ in 0..8 {
                if donor != cur_target && node_role(f, donor) != node_role(f, cur_target) {
                    break;
                }
                donor = *rng.pick(&nodes);
            }
            if rng.chance(50) {
                // Rewrite the pointer.
                let mut nb = block(&f.image, b).to_vec();
                nb[off..off + 8].copy_from_slice(&donor.to_le_bytes());
                reseal(&mut nb, kind_of(f, b));
                let e = if donor == cur_target {
                    Expect::NoOp("same pointer")
                } else {
                    Expect::Flag
                };
                case(
                    Kind::Foreign,
                    format!("pointer in block {b} at {off} -> node {donor} (was {cur_target})"),
                    vec![(b, nb)],
                    None,
                    e,
                    BTreeSet::new(),
                    true,
                );
            } else {
                // Copy the donor over the pointed-at node.
                let mut nb = block(&f.image, donor).to_vec();
                nb[8..16].copy_from_slice(&cur_target.to_le_bytes());
                reseal(&mut nb, BlockKind::BTreeNode);
                let e = if nb[4..] == block(&f.image, cur_target)[4..] {
                    Expect::NoOp("same content")
                } else {
                    Expect::Flag
                };
                case(
                    Kind::Foreign,
                    format!("node {donor} copied over node {cur_target} (child of {b})"),
                    vec![(cur_target, nb)],
                    None,
                    e,
                    BTreeSet::new(),
                    true,
                );
            }
        }
    }
    cases
}

/// (block, byte offset) of every pointer to a btree node: the superblock's
/// tree roots, internal nodes' children, the top-level leaves' values.
fn pointer_slots(f: &Fixture) -> Vec<(u64, usize)> {
    let mut out = vec![];
    for (&b, roles) in &f.roles {
        for r in roles {
            match *r {
                Role::Superblock => {
                    out.push((b, 320));
                    out.push((b, 328));
                }
                Role::Node { tree, leaf, .. } => {
                    if leaf && tree != Tree::Top {
                        continue;
                    }
                    let data = block(&f.image, b);
                    let nr = le32(data, 16) as usize;
                    let max = le32(data, 20) as usize;
                    out.extend((0..nr).map(|i| (b, 32 + 8 * max + 8 * i)));
                }
                _ => {}
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

// ---------------------------------------------------------------- running

#[derive(Default, Debug)]
struct Tally {
    cases: usize,
    flag_required: usize,
    flagged: usize,
    noop: usize,
    semantic: usize,
    earlier: usize,
    unreferenced: usize,
    repaired: usize,
    repair_refused: usize,
    survivors_checked: usize,
    dump_repair_ok: usize,
}

fn no_crash(out: &Output, what: &str) -> Result<i32, String> {
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("panicked") {
        return Err(format!("{what}: panic: {err}"));
    }
    match out.status.code() {
        None => Err(format!("{what}: killed by a signal ({:?})", out.status)),
        Some(2) => Err(format!("{what}: exit 2: {err}")),
        Some(70) => Err(format!("{what}: internal error (70): {err}")),
        Some(c) => Ok(c),
    }
}

fn run_case(f: &Fixture, c: &Case, dir: &Path, t: &mut Tally) -> Result<(), String> {
    let img = dir.join("img");
    let mut bytes = f.image.clone();
    let mut damaged: BTreeSet<u64> = BTreeSet::new();
    for (b, nb) in &c.patches {
        let r = *b as usize * BS..(*b as usize + 1) * BS;
        if bytes[r.clone()] != nb[..] {
            damaged.insert(*b);
        }
        bytes[r].copy_from_slice(nb);
    }
    if let Some(len) = c.truncate {
        damaged.extend(len / BS as u64..(f.image.len() / BS) as u64);
        bytes.truncate(len as usize);
    }
    let expect = if damaged.is_empty() {
        Expect::NoOp("bytes unchanged")
    } else {
        c.expect.clone()
    };
    write_file(&img, &bytes);
    let p = img.to_str().unwrap();
    let what = &c.what;

    // Property 1 and 2: thin_check.
    let out = run_tool("thin_check", &[p]);
    let code = no_crash(&out, &format!("{what}: thin_check"))?;
    t.cases += 1;
    match expect {
        Expect::Flag => {
            t.flag_required += 1;
            if code == 0 {
                return Err(format!("{what}: thin_check passed damaged metadata"));
            }
            t.flagged += 1;
        }
        Expect::NoOp(_) => t.noop += 1,
        Expect::Semantic(_) => t.semantic += 1,
        Expect::EarlierState => t.earlier += 1,
        Expect::Unreferenced => t.unreferenced += 1,
    }

    // Property 5: thin_dump --repair. When the superblock or the details or
    // top-level trees are hit, repair falls back to the held snapshot or a
    // scan, which may find older nodes; a node reached by a wrong pointer
    // (or re-sealed) cannot be told from the right one without recounting
    // references. Then: every mapping printed is an entry of a valid leaf on
    // the device (as it was, or as damaged); none is invented.
    let scan = c.relaxed || damaged.iter().any(|b| f.index_blocks.contains(b));
    let mut found = BTreeSet::new();
    if scan {
        for &b in &damaged {
            if ((b as usize + 1) * BS) <= bytes.len() {
                leaf_mappings(block(&bytes, b), b, f.sb_time, &mut found);
            }
        }
    }
    let out = run_tool("thin_dump", &["--repair", p]);
    let code = no_crash(&out, &format!("{what}: thin_dump --repair"))?;
    if code == 0 {
        t.dump_repair_ok += 1;
        let maps = parse_dump(&String::from_utf8_lossy(&out.stdout));
        for (dev, ms) in &maps {
            for m in ms {
                let fine = f.allowed.get(dev).is_some_and(|a| a.contains(m))
                    || c.extra.contains(m)
                    || (scan && (f.disk.contains(m) || found.contains(m)));
                if !fine {
                    return Err(format!(
                        "{what}: thin_dump --repair printed device {dev} mapping {m:?}, not in the original"
                    ));
                }
            }
        }
    }

    // Properties 3 and 4: thin_repair.
    let out_img = dir.join("out");
    zero_file(&out_img, f.image.len() as u64);
    let o = out_img.to_str().unwrap();
    let out = run_tool("thin_repair", &["-i", p, "-o", o]);
    let code = no_crash(&out, &format!("{what}: thin_repair"))?;
    if code != 0 {
        let err = String::from_utf8_lossy(&out.stderr);
        if ![65, 66, 74].contains(&code) || err.trim().lines().count() != 1 {
            return Err(format!(
                "{what}: thin_repair refused with exit {code}: {err}"
            ));
        }
        t.repair_refused += 1;
        return Ok(());
    }
    t.repaired += 1;
    let chk = run_tool("thin_check", &[o]);
    if no_crash(&chk, &format!("{what}: thin_check of the repair"))? != 0 {
        return Err(format!(
            "{what}: thin_repair output fails thin_check: {}",
            String::from_utf8_lossy(&chk.stderr)
        ));
    }
    let out = run_tool("thin_dump", &[o]);
    no_crash(&out, &format!("{what}: thin_dump of the repair"))?;
    let repaired = parse_dump(&String::from_utf8_lossy(&out.stdout));
    // A device's root is found through the superblock, the top-level tree
    // and the details tree; when any of them is hit, only a scan among
    // equally valid older nodes could find it (not asserted).
    let index_lost = damaged
        .iter()
        .any(|b| *b == 0 || f.top_blocks.contains(b) || f.details_blocks.contains(b));
    for (dev, blocks) in &f.dev_blocks {
        if index_lost || blocks.iter().any(|b| damaged.contains(b)) {
            continue;
        }
        t.survivors_checked += 1;
        let want = &f.live[dev];
        match repaired.get(dev) {
            Some(got) if got == want => {}
            Some(got) => {
                return Err(format!(
                    "{what}: device {dev} survived but was repaired with {} mappings ({} missing, {} extra) instead of {}",
                    got.len(),
                    want.difference(got).count(),
                    got.difference(want).count(),
                    want.len()
                ))
            }
            None => return Err(format!("{what}: device {dev} survived but was not recovered")),
        }
    }
    Ok(())
}

#[test]
fn damage_corpus() {
    let start = Instant::now();
    let shm = Path::new("/dev/shm");
    let tmp = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let dir = tmp.path();
    let fixtures = vec![kernel_small(dir), snap_pool(dir), two_level(dir)];
    let mut rng = Rng(SEED);
    let cases = gen_cases(&fixtures, &mut rng);
    assert!(cases.len() >= 1000, "{} cases", cases.len());
    let setup = start.elapsed();

    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::<String>::new());
    let tallies = Mutex::new(BTreeMap::<Kind, Tally>::new());
    let threads: usize = std::env::var("DAMAGE_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    std::thread::scope(|s| {
        for w in 0..threads {
            let (next, failures, tallies, cases, fixtures) =
                (&next, &failures, &tallies, &cases, &fixtures);
            let wdir = dir.join(format!("w{w}"));
            std::fs::create_dir_all(&wdir).unwrap();
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(c) = cases.get(i) else { break };
                let mut t = Tally::default();
                let r = run_case(&fixtures[c.fixture], c, &wdir, &mut t);
                if let Err(e) = r {
                    failures.lock().unwrap().push(e);
                }
                let mut all = tallies.lock().unwrap();
                let a = all.entry(c.kind).or_default();
                a.cases += t.cases;
                a.flag_required += t.flag_required;
                a.flagged += t.flagged;
                a.noop += t.noop;
                a.semantic += t.semantic;
                a.earlier += t.earlier;
                a.unreferenced += t.unreferenced;
                a.repaired += t.repaired;
                a.repair_refused += t.repair_refused;
                a.survivors_checked += t.survivors_checked;
                a.dump_repair_ok += t.dump_repair_ok;
            });
        }
    });

    let tallies = tallies.into_inner().unwrap();
    eprintln!(
        "damage corpus: {} cases over {} fixtures, seed {SEED:#x}, {:.1}s ({:.1}s setup)",
        cases.len(),
        fixtures.len(),
        start.elapsed().as_secs_f64(),
        setup.as_secs_f64()
    );
    eprintln!(
        "{:<12} {:>5} {:>9} {:>7} {:>5} {:>8} {:>7} {:>6} {:>8} {:>7} {:>9} {:>9}",
        "kind",
        "cases",
        "must-flag",
        "flagged",
        "no-op",
        "semantic",
        "earlier",
        "unref",
        "repaired",
        "refused",
        "survivors",
        "dump-rep"
    );
    for (k, t) in &tallies {
        eprintln!(
            "{:<12} {:>5} {:>9} {:>7} {:>5} {:>8} {:>7} {:>6} {:>8} {:>7} {:>9} {:>9}",
            format!("{k:?}"),
            t.cases,
            t.flag_required,
            t.flagged,
            t.noop,
            t.semantic,
            t.earlier,
            t.unreferenced,
            t.repaired,
            t.repair_refused,
            t.survivors_checked,
            t.dump_repair_ok
        );
    }
    let failures = failures.into_inner().unwrap();
    for f in failures.iter().take(400) {
        eprintln!("FAIL {f}");
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed",
        failures.len(),
        cases.len()
    );
}
