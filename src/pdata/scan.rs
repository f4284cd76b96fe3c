//! Scanning a whole metadata device for blocks that still look valid, for
//! repair when the pointers to them (superblock, roots) are damaged.

use crate::pdata::btree::Node;
use crate::pdata::checksum::{self, BlockKind};
use crate::pdata::io::BlockDevice;
use crate::pdata::{le64, Result, BLOCK_SIZE};

/// A btree node found by the scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScannedNode {
    pub block: u64,
    pub leaf: bool,
    pub value_size: u32,
    pub nr_entries: u32,
    /// Index of this node's children in [`Scan::children`] (internal nodes).
    pub children: (u32, u32),
    /// Leaves with 8-byte values: the largest low 24 bits of a value (for
    /// thin mapping leaves, the latest pool time written there).
    pub max_low24: u32,
    /// How many values of such a leaf carry `max_low24`.
    pub nr_at_max: u32,
}

/// What the scan found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Valid btree nodes, in block order.
    pub nodes: Vec<ScannedNode>,
    /// Children of internal nodes, concatenated.
    pub children: Vec<u64>,
    /// Blocks holding a valid thin superblock checksum at their own location
    /// (the live superblock at 0, metadata snapshot copies elsewhere).
    pub superblocks: Vec<u64>,
}

impl Scan {
    /// The scanned node at `block`, if any.
    pub fn node(&self, block: u64) -> Option<&ScannedNode> {
        self.nodes
            .binary_search_by_key(&block, |n| n.block)
            .ok()
            .map(|i| &self.nodes[i])
    }

    pub fn children_of(&self, n: &ScannedNode) -> &[u64] {
        &self.children[n.children.0 as usize..n.children.1 as usize]
    }
}

/// Blocks read per `pread`.
const CHUNK: usize = 1024;

/// Read every block of `dev` and keep the ones that validate as btree nodes
/// (checksum, self-location, header) or superblocks. `leaf_value_size` tells
/// the node checker what a leaf may hold: any size is accepted here.
pub fn scan(dev: &BlockDevice, progress: &mut dyn FnMut(u64, u64)) -> Result<Scan> {
    let nr = dev.nr_blocks();
    let mut out = Scan::default();
    let mut buf = vec![0u8; CHUNK * BLOCK_SIZE];
    let mut first = 0u64;
    while first < nr {
        let n = (nr - first).min(CHUNK as u64) as usize;
        let chunk = &mut buf[..n * BLOCK_SIZE];
        dev.read_run(first, chunk)?;
        for i in 0..n {
            let loc = first + i as u64;
            let data = &chunk[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE];
            if le64(data, 8) != loc {
                continue;
            }
            match checksum::identify(data) {
                Some(BlockKind::BTreeNode) => {
                    // Value size as the header says; Node::parse checks the rest.
                    let vs = crate::pdata::le32(data, 24) as usize;
                    let Ok(node) = Node::parse(loc, data, vs) else {
                        continue;
                    };
                    let start = out.children.len() as u32;
                    let mut max_low24 = 0;
                    let mut nr_at_max = 0;
                    if !node.is_leaf() {
                        out.children
                            .extend((0..node.nr_entries()).map(|j| node.child(j)));
                    } else if vs == 8 {
                        for j in 0..node.nr_entries() {
                            let t = (node.value::<u64>(j) & 0xff_ffff) as u32;
                            if t > max_low24 || nr_at_max == 0 {
                                max_low24 = t;
                                nr_at_max = 0;
                            }
                            if t == max_low24 {
                                nr_at_max += 1;
                            }
                        }
                    }
                    out.nodes.push(ScannedNode {
                        block: loc,
                        leaf: node.is_leaf(),
                        value_size: vs as u32,
                        nr_entries: node.nr_entries() as u32,
                        children: (start, out.children.len() as u32),
                        max_low24,
                        nr_at_max,
                    });
                }
                Some(BlockKind::ThinSuperblock) => out.superblocks.push(loc),
                _ => {}
            }
        }
        first += n as u64;
        progress(first, nr);
    }
    Ok(out)
}
