//! Editing btrees inside a [`Transaction`]: lookup, insert (splitting full
//! nodes), remove (rebalancing), listing — on the kernel's node format and
//! with the kernel's reference-counting rules.
//!
//! - A tree is held through one reference to its root. An operation that
//!   changes a tree takes the caller's reference to the old root and returns
//!   the new root, to which that reference has moved (the same block when
//!   the root was already this transaction's own, unshared copy).
//! - Every node is shadowed before it changes ([`shadow_node`]): a block the
//!   committed metadata uses is never written, and a node with other owners
//!   (count > 1) is copied, its children (or what its leaf values reference)
//!   gaining one reference, the original losing one.
//! - Every non-root node keeps at least a third of its `max_entries`; the key
//!   of each child in an internal node is the child's first key.
//! - Nodes are sealed after every change, so this transaction's copies read
//!   back (and validate) like blocks on disk.
//! - On an error the tree may be half changed inside the transaction:
//!   abandon the transaction (nothing reaches the device before commit).
//!
//! Values and references: what a leaf value references is told by
//! [`ValueRefs`]; releasing a value is [`release_value`]. A value handed to
//! [`insert`] carries its own reference (already counted), which moves into
//! the tree; a value [`insert`] overwrites or [`remove`] removes is released.
//! To change a subtree in place (the two-level thin mapping tree), use
//! [`update_subtree`] (or [`insert_with`]): it shadows the top-level path
//! first, hands the old subtree root to the caller and stores the new root
//! without releasing the old one, whose reference the subtree's own
//! shadowing already moved.

use crate::pdata::btree::node::{max_entries, Node, INTERNAL_NODE, LEAF_NODE, NODE_HEADER_SIZE};
use crate::pdata::checksum::{seal, BlockKind};
use crate::pdata::txn::{Transaction, ValueRefs};
use crate::pdata::{le32, le64, Error, Result, BLOCK_SIZE};

/// No btree is this deep (a 4 KiB-node tree of 2^64 keys has 9 levels):
/// deeper means a loop in corrupt metadata.
const MAX_DEPTH: usize = 32;

/// A node taken apart for editing.
#[derive(Debug, Clone)]
struct Ed {
    leaf: bool,
    max: usize,
    vs: usize,
    keys: Vec<u64>,
    /// `keys.len()` values of `vs` bytes each.
    vals: Vec<u8>,
}

impl Ed {
    fn empty(leaf: bool, vs: usize) -> Ed {
        Ed {
            leaf,
            max: max_entries(vs),
            vs,
            keys: Vec::new(),
            vals: Vec::new(),
        }
    }

    fn from_node(n: &Node) -> Ed {
        let vs = n.value_size();
        let mut vals = Vec::with_capacity(n.nr_entries() * vs);
        for i in 0..n.nr_entries() {
            vals.extend_from_slice(n.value_bytes(i));
        }
        Ed {
            leaf: n.is_leaf(),
            max: n.max_entries(),
            vs,
            keys: n.keys().collect(),
            vals,
        }
    }

    fn nr(&self) -> usize {
        self.keys.len()
    }
    fn is_full(&self) -> bool {
        self.nr() >= self.max
    }
    /// Fewer entries than a non-root node may hold (a third of the maximum;
    /// never zero).
    fn is_underfull(&self) -> bool {
        self.nr() < (self.max / 3).max(1)
    }
    fn first_key(&self) -> Option<u64> {
        self.keys.first().copied()
    }
    fn val(&self, i: usize) -> &[u8] {
        &self.vals[i * self.vs..(i + 1) * self.vs]
    }
    /// Child `i` of an internal node (whose values are 8 bytes: Node::parse checked).
    fn child(&self, i: usize) -> u64 {
        le64(self.val(i), 0)
    }
    fn set_val(&mut self, i: usize, v: &[u8]) {
        let vs = self.vs;
        self.vals[i * vs..(i + 1) * vs].copy_from_slice(v);
    }
    fn set_child(&mut self, i: usize, b: u64) {
        self.set_val(i, &b.to_le_bytes());
    }
    fn insert_at(&mut self, i: usize, key: u64, v: &[u8]) {
        self.keys.insert(i, key);
        let at = i * self.vs;
        self.vals.splice(at..at, v.iter().copied());
    }
    fn remove_at(&mut self, i: usize) -> Vec<u8> {
        self.keys.remove(i);
        self.vals.drain(i * self.vs..(i + 1) * self.vs).collect()
    }
    /// Entries `at..` as a new node of the same kind.
    fn split_off(&mut self, at: usize) -> Ed {
        Ed {
            leaf: self.leaf,
            max: self.max,
            vs: self.vs,
            keys: self.keys.split_off(at),
            vals: self.vals.split_off(at * self.vs),
        }
    }
    fn append(&mut self, mut other: Ed) {
        self.keys.append(&mut other.keys);
        self.vals.append(&mut other.vals);
    }
    fn prepend(&mut self, mut other: Ed) {
        other.keys.extend_from_slice(&self.keys);
        other.vals.extend_from_slice(&self.vals);
        self.keys = other.keys;
        self.vals = other.vals;
    }
    fn search(&self, key: u64) -> std::result::Result<usize, usize> {
        self.keys.binary_search(&key)
    }
    /// Internal nodes: the child whose range holds `key`; None below the first key.
    fn child_index(&self, key: u64) -> Option<usize> {
        match self.search(key) {
            Ok(i) => Some(i),
            Err(0) => None,
            Err(i) => Some(i - 1),
        }
    }

    /// Lay the node out as block `b` (unused slots zero) and seal it.
    fn encode_into(&self, b: u64, d: &mut [u8]) {
        d.fill(0);
        let flags = if self.leaf { LEAF_NODE } else { INTERNAL_NODE };
        d[4..8].copy_from_slice(&flags.to_le_bytes());
        d[8..16].copy_from_slice(&b.to_le_bytes());
        d[16..20].copy_from_slice(&(self.nr() as u32).to_le_bytes());
        d[20..24].copy_from_slice(&(self.max as u32).to_le_bytes());
        d[24..28].copy_from_slice(&(self.vs as u32).to_le_bytes());
        for (i, k) in self.keys.iter().enumerate() {
            let o = NODE_HEADER_SIZE + 8 * i;
            d[o..o + 8].copy_from_slice(&k.to_le_bytes());
        }
        let vb = NODE_HEADER_SIZE + 8 * self.max;
        d[vb..vb + self.vals.len()].copy_from_slice(&self.vals);
        seal(d, BlockKind::BTreeNode);
    }
}

/// Read node `b` as this transaction sees it. `leaf_vs`: the value size the
/// tree's leaves must have; None takes the node's own (any leaf size).
fn load(txn: &Transaction, b: u64, leaf_vs: Option<usize>) -> Result<Ed> {
    let data = txn.read(b)?;
    let vs = leaf_vs.unwrap_or_else(|| le32(&data, 24) as usize);
    Ok(Ed::from_node(&Node::parse(b, &data, vs)?))
}

/// Write `e` to `b`, a block this transaction allocated.
fn store(txn: &mut Transaction, b: u64, e: &Ed) -> Result<()> {
    if e.nr() > e.max || NODE_HEADER_SIZE + e.max * (8 + e.vs) > BLOCK_SIZE {
        return Err(Error::Other(format!(
            "btree edit: {} entries of {} bytes do not fit node {b} (max_entries {})",
            e.nr(),
            e.vs,
            e.max
        )));
    }
    let d = txn.block_mut(b)?;
    e.encode_into(b, &mut d[..]);
    Ok(())
}

fn value_u64(v: &[u8], what: &str) -> Result<u64> {
    match v.try_into() {
        Ok(a) => Ok(u64::from_le_bytes(a)),
        Err(_) => Err(Error::Other(format!(
            "{what} values are 8 bytes, not {}",
            v.len()
        ))),
    }
}

/// One more reference to everything node `b` references: its children, or
/// (leaves) what its values reference per `refs`.
fn inc_entries(txn: &mut Transaction, b: u64, node: &Node, refs: ValueRefs) -> Result<()> {
    if !node.is_leaf() {
        for i in 0..node.nr_entries() {
            txn.inc(node.child(i));
        }
        return Ok(());
    }
    if refs == ValueRefs::Nothing {
        return Ok(());
    }
    if node.value_size() != 8 {
        return Err(Error::invalid(
            b,
            format!(
                "leaf values are {} bytes; {refs:?} values are 8",
                node.value_size()
            ),
        ));
    }
    for i in 0..node.nr_entries() {
        let v = le64(node.value_bytes(i), 0);
        match refs {
            ValueRefs::DataBlockTime => txn.data_inc(v >> 24),
            ValueRefs::MetadataRoot => txn.inc(v),
            ValueRefs::Nothing => {}
        }
    }
    Ok(())
}

/// Make btree node `b` writable and return where it now lives, as the
/// kernel's `dm_tm_shadow_block`: `b` itself when this transaction made it
/// and nobody else references it; else a copy in a fresh block (count 1),
/// `b` losing one reference and — when `b` had other owners — everything
/// `b` references (children, or leaf values per `refs`) gaining one.
///
/// Unlike [`Transaction::shadow`] this also copies a block the transaction
/// made that has since been shared (a clone took its root: count > 1), and
/// never reads 8-byte values out of leaves of other sizes.
pub fn shadow_node(txn: &mut Transaction, b: u64, refs: ValueRefs) -> Result<u64> {
    let shared = txn.meta_count(b) > 1;
    if txn.is_fresh(b) && !shared {
        return Ok(b);
    }
    let mut data = txn.read(b)?;
    let vs = le32(&data, 24) as usize;
    {
        let node = Node::parse(b, &data, vs)?;
        if shared {
            inc_entries(txn, b, &node, refs)?;
        }
    }
    let new = txn.alloc(BlockKind::BTreeNode)?;
    data[8..16].copy_from_slice(&new.to_le_bytes());
    seal(&mut data, BlockKind::BTreeNode);
    txn.block_mut(new)?.copy_from_slice(&data);
    txn.dec(b)?;
    Ok(new)
}

/// Give up node `b` whose entries now live in another node: what it
/// references keeps its count (the references moved) unless `b` has other
/// owners, in which case it gains one; `b` loses one.
fn release_moved(txn: &mut Transaction, b: u64, refs: ValueRefs) -> Result<()> {
    if txn.meta_count(b) > 1 {
        let data = txn.read(b)?;
        let node = Node::parse(b, &data, le32(&data, 24) as usize)?;
        inc_entries(txn, b, &node, refs)?;
    }
    txn.dec(b)?;
    Ok(())
}

/// Release one reference held by a leaf value, as the kernel's value types
/// do: a data block (`DataBlockTime`: the block in the high 40 bits), a
/// device's mapping tree (`MetadataRoot`: [`Transaction::del_tree`] with
/// mapping leaves below), or nothing.
pub fn release_value(txn: &mut Transaction, value: &[u8], refs: ValueRefs) -> Result<()> {
    match refs {
        ValueRefs::Nothing => Ok(()),
        ValueRefs::DataBlockTime => {
            let v = value_u64(value, "block/time")?;
            txn.data_dec(v >> 24)?;
            Ok(())
        }
        ValueRefs::MetadataRoot => {
            let v = value_u64(value, "subtree root")?;
            txn.del_tree(v, &[ValueRefs::DataBlockTime])
        }
    }
}

/// The leaf entry for `key`, reading only: (value, the leaf's value size).
fn find(
    txn: &Transaction,
    root: u64,
    key: u64,
    leaf_vs: Option<usize>,
) -> Result<Option<(Vec<u8>, usize)>> {
    let mut b = root;
    for _ in 0..MAX_DEPTH {
        let n = load(txn, b, leaf_vs)?;
        if n.leaf {
            return Ok(n.search(key).ok().map(|i| (n.val(i).to_vec(), n.vs)));
        }
        match n.child_index(key) {
            Some(i) => b = n.child(i),
            None => return Ok(None),
        }
    }
    Err(too_deep(root))
}

fn too_deep(root: u64) -> Error {
    Error::invalid(
        root,
        format!("btree deeper than {MAX_DEPTH} levels (a loop in the tree?)"),
    )
}

/// Value of `key` in the tree at `root` (leaf values `value_size` bytes).
pub fn lookup(
    txn: &Transaction,
    root: u64,
    key: u64,
    value_size: usize,
) -> Result<Option<Vec<u8>>> {
    Ok(find(txn, root, key, Some(value_size))?.map(|(v, _)| v))
}

/// A new empty tree (one empty leaf, count 1) whose leaves hold
/// `value_size`-byte values.
pub fn empty_tree(txn: &mut Transaction, value_size: usize) -> Result<u64> {
    if value_size == 0 || max_entries(value_size) < 3 {
        return Err(Error::Other(format!(
            "btree values of {value_size} bytes are not supported"
        )));
    }
    let b = txn.alloc(BlockKind::BTreeNode)?;
    store(txn, b, &Ed::empty(true, value_size))?;
    Ok(b)
}

/// Insert or overwrite; returns the new root (the caller's reference moves
/// to it) and the old value if any. The new value's reference is the
/// caller's (already counted) and moves into the tree; an overwritten value
/// is released per `refs` — also when it equals the new one, whose reference
/// the caller counted. (To replace a subtree root by the new root of the
/// same subtree, use [`update_subtree`] or [`insert_with`].)
pub fn insert(
    txn: &mut Transaction,
    root: u64,
    key: u64,
    value: &[u8],
    refs: ValueRefs,
) -> Result<(u64, Option<Vec<u8>>)> {
    let (root, old) = insert_no_release(txn, root, key, value, refs)?;
    if let Some(v) = &old {
        release_value(txn, v, refs)?;
    }
    Ok((root, old))
}

/// [`insert`] that does not release an overwritten value: its reference
/// becomes the caller's.
pub fn insert_no_release(
    txn: &mut Transaction,
    root: u64,
    key: u64,
    value: &[u8],
    refs: ValueRefs,
) -> Result<(u64, Option<Vec<u8>>)> {
    insert_with(txn, root, key, value.len(), refs, |_, _| Ok(value.to_vec()))
}

/// Insert or overwrite the value of `key` with `make(txn, old value)`,
/// called once the path to the leaf is shadowed (and split where full).
/// The old value is not released: `make` takes over its reference (for a
/// subtree root: changes the subtree, whose shadowing moves the reference,
/// and returns the new root). Returns the new root and the old value.
/// `make` must not change this tree.
pub fn insert_with<F>(
    txn: &mut Transaction,
    root: u64,
    key: u64,
    value_size: usize,
    refs: ValueRefs,
    make: F,
) -> Result<(u64, Option<Vec<u8>>)>
where
    F: FnOnce(&mut Transaction, Option<&[u8]>) -> Result<Vec<u8>>,
{
    if refs != ValueRefs::Nothing && value_size != 8 {
        return Err(Error::Other(format!(
            "{refs:?} values are 8 bytes, not {value_size}"
        )));
    }
    // Validate the path (and the leaves' value size) before changing anything.
    find(txn, root, key, Some(value_size))?;

    let root = shadow_node(txn, root, refs)?;
    let mut n = load(txn, root, Some(value_size))?;
    if n.is_full() {
        n = split_beneath(txn, root, n)?;
    }
    let mut nb = root;
    for _ in 0..MAX_DEPTH {
        if n.leaf {
            let checked = |v: Vec<u8>| -> Result<Vec<u8>> {
                if v.len() == value_size {
                    Ok(v)
                } else {
                    Err(Error::Other(format!(
                        "btree insert: value of {} bytes into leaves of {value_size}",
                        v.len()
                    )))
                }
            };
            let old = match n.search(key) {
                Ok(i) => {
                    let old = n.val(i).to_vec();
                    let new = checked(make(txn, Some(&old))?)?;
                    n.set_val(i, &new);
                    Some(old)
                }
                Err(i) => {
                    let new = checked(make(txn, None)?)?;
                    n.insert_at(i, key, &new);
                    None
                }
            };
            store(txn, nb, &n)?;
            return Ok((root, old));
        }
        // Below the first key: the leftmost path takes the new first key.
        let i = match n.child_index(key) {
            Some(i) => i,
            None => {
                n.keys[0] = key;
                0
            }
        };
        let c = shadow_node(txn, n.child(i), refs)?;
        n.set_child(i, c);
        let mut next = load(txn, c, Some(value_size))?;
        let mut next_b = c;
        if next.is_full() {
            // `n` is not full: it was split on the way down if it was.
            if next.nr() < 2 {
                return Err(Error::invalid(c, "node too small to split"));
            }
            let right = next.split_off(next.nr() / 2);
            let rb = txn.alloc(BlockKind::BTreeNode)?;
            store(txn, rb, &right)?;
            store(txn, c, &next)?;
            let rk = right.keys[0];
            n.insert_at(i + 1, rk, &rb.to_le_bytes());
            if key >= rk {
                next_b = rb;
                next = right;
            }
        }
        store(txn, nb, &n)?;
        nb = next_b;
        n = next;
    }
    Err(too_deep(root))
}

/// Split the full root `n` (at `b`) into two new children under it: the
/// root keeps its block and the tree grows one level. Returns the new root.
fn split_beneath(txn: &mut Transaction, b: u64, mut n: Ed) -> Result<Ed> {
    if n.nr() < 2 {
        return Err(Error::invalid(b, "node too small to split"));
    }
    let right = n.split_off(n.nr() / 2);
    let lb = txn.alloc(BlockKind::BTreeNode)?;
    let rb = txn.alloc(BlockKind::BTreeNode)?;
    store(txn, lb, &n)?;
    store(txn, rb, &right)?;
    let mut top = Ed::empty(false, 8);
    top.insert_at(0, n.keys[0], &lb.to_le_bytes());
    top.insert_at(1, right.keys[0], &rb.to_le_bytes());
    store(txn, b, &top)?;
    Ok(top)
}

/// Change the subtree that `key` of the two-level tree at `root` holds (the
/// thin mapping tree: top-level values are the roots of the devices' trees,
/// [`ValueRefs::MetadataRoot`]), as the kernel does: the top-level path is
/// shadowed first (so a shared top-level leaf gives the subtree root its
/// extra reference before the subtree is shadowed), then `f(txn, old
/// subtree root or None)` changes or creates the subtree and returns its new
/// root, which replaces the old one without releasing it. Returns the new
/// top-level root.
pub fn update_subtree<F>(txn: &mut Transaction, root: u64, key: u64, f: F) -> Result<u64>
where
    F: FnOnce(&mut Transaction, Option<u64>) -> Result<u64>,
{
    let (root, _) = insert_with(txn, root, key, 8, ValueRefs::MetadataRoot, |txn, old| {
        let old = old.map(|v| le64(v, 0));
        Ok(f(txn, old)?.to_le_bytes().to_vec())
    })?;
    Ok(root)
}

/// Remove; returns the new root and the removed value, released per `refs`.
/// A key that is not there changes nothing: (root, None).
pub fn remove(
    txn: &mut Transaction,
    root: u64,
    key: u64,
    refs: ValueRefs,
) -> Result<(u64, Option<Vec<u8>>)> {
    remove_impl(txn, root, key, refs, true)
}

/// [`remove`] keeping the removed value: its reference becomes the caller's.
pub fn remove_keep_value(
    txn: &mut Transaction,
    root: u64,
    key: u64,
    refs: ValueRefs,
) -> Result<(u64, Option<Vec<u8>>)> {
    remove_impl(txn, root, key, refs, false)
}

fn remove_impl(
    txn: &mut Transaction,
    root: u64,
    key: u64,
    refs: ValueRefs,
    release: bool,
) -> Result<(u64, Option<Vec<u8>>)> {
    // Read-only first: an absent key (or a damaged path) changes nothing.
    let Some((_, vs)) = find(txn, root, key, None)? else {
        return Ok((root, None));
    };
    if refs != ValueRefs::Nothing && vs != 8 {
        return Err(Error::invalid(
            root,
            format!("leaf values are {vs} bytes; {refs:?} values are 8"),
        ));
    }
    let mut root = shadow_node(txn, root, refs)?;
    let (removed, mut n) = remove_rec(txn, root, key, vs, refs, 0)?;
    // An internal root with a single child gives way to the child.
    let mut depth = 0;
    while !n.leaf && n.nr() == 1 {
        depth += 1;
        if depth > MAX_DEPTH {
            return Err(too_deep(root));
        }
        let child = n.child(0);
        // The root's reference to the child becomes the tree's reference.
        txn.dec(root)?;
        root = child;
        n = load(txn, root, Some(vs))?;
    }
    if let (Some(v), true) = (&removed, release) {
        release_value(txn, v, refs)?;
    }
    Ok((root, removed))
}

/// Remove `key` below node `nb` (already writable); returns the removed
/// value and the node as it now is. Children left under a third full are
/// refilled from, or merged with, a sibling.
fn remove_rec(
    txn: &mut Transaction,
    nb: u64,
    key: u64,
    vs: usize,
    refs: ValueRefs,
    depth: usize,
) -> Result<(Option<Vec<u8>>, Ed)> {
    if depth > MAX_DEPTH {
        return Err(too_deep(nb));
    }
    let mut n = load(txn, nb, Some(vs))?;
    if n.leaf {
        let removed = match n.search(key) {
            Ok(i) => Some(n.remove_at(i)),
            Err(_) => None,
        };
        if removed.is_some() {
            store(txn, nb, &n)?;
        }
        return Ok((removed, n));
    }
    let Some(i) = n.child_index(key) else {
        return Ok((None, n));
    };
    let c = shadow_node(txn, n.child(i), refs)?;
    n.set_child(i, c);
    let (removed, cn) = remove_rec(txn, c, key, vs, refs, depth + 1)?;
    if let Some(k) = cn.first_key() {
        n.keys[i] = k;
    }
    if cn.is_underfull() && n.nr() > 1 {
        rebalance(txn, &mut n, i, c, cn, vs, refs)?;
    }
    store(txn, nb, &n)?;
    Ok((removed, n))
}

/// Child `i` of `parent` (`cb`, writable, contents `c`) is under a third
/// full: merge it with a sibling when together they cannot both hold a
/// third, else share their entries evenly. Keeps `parent`'s keys the
/// children's first keys.
fn rebalance(
    txn: &mut Transaction,
    parent: &mut Ed,
    i: usize,
    cb: u64,
    mut c: Ed,
    vs: usize,
    refs: ValueRefs,
) -> Result<()> {
    let j = if i + 1 < parent.nr() { i + 1 } else { i - 1 };
    let sb = parent.child(j);
    let s = load(txn, sb, Some(vs))?;
    if s.leaf != c.leaf {
        return Err(Error::invalid(
            sb,
            format!("sibling of node {cb} is at a different depth"),
        ));
    }
    let third = (c.max.min(s.max) / 3).max(1);
    let total = c.nr() + s.nr();
    if total < 2 * third {
        // Merge the sibling into the child; the sibling's block is given up.
        if j < i {
            c.prepend(s);
        } else {
            c.append(s);
        }
        store(txn, cb, &c)?;
        release_moved(txn, sb, refs)?;
        let lo = i.min(j);
        parent.remove_at(i.max(j));
        parent.set_child(lo, cb);
        if let Some(k) = c.first_key() {
            parent.keys[lo] = k;
        }
        return Ok(());
    }
    // Redistribute: both end with at least a third.
    let sb2 = shadow_node(txn, sb, refs)?;
    parent.set_child(j, sb2);
    let (li, lb, mut l, rb, mut r) = if j < i {
        (j, sb2, s, cb, c)
    } else {
        (i, cb, c, sb2, s)
    };
    let want = total / 2;
    if l.nr() > want {
        let tail = l.split_off(want);
        r.prepend(tail);
    } else if l.nr() < want {
        let rest = r.split_off(want - l.nr());
        let head = std::mem::replace(&mut r, rest);
        l.append(head);
    }
    store(txn, lb, &l)?;
    store(txn, rb, &r)?;
    if let (Some(lk), Some(rk)) = (l.first_key(), r.first_key()) {
        parent.keys[li] = lk;
        parent.keys[li + 1] = rk;
    }
    Ok(())
}

/// All (key, value) in key order (for tests and small trees).
pub fn entries(txn: &Transaction, root: u64, value_size: usize) -> Result<Vec<(u64, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut budget = txn.device().nr_blocks();
    collect(txn, root, value_size, 0, &mut budget, &mut out)?;
    Ok(out)
}

fn collect(
    txn: &Transaction,
    b: u64,
    vs: usize,
    depth: usize,
    budget: &mut u64,
    out: &mut Vec<(u64, Vec<u8>)>,
) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(too_deep(b));
    }
    // A tree holds each node once: more nodes than blocks is a loop.
    if *budget == 0 {
        return Err(Error::invalid(
            b,
            "btree has more nodes than the device blocks",
        ));
    }
    *budget -= 1;
    let n = load(txn, b, Some(vs))?;
    if n.leaf {
        if let (Some(&(last, _)), Some(first)) = (out.last(), n.first_key()) {
            if first <= last {
                return Err(Error::invalid(
                    b,
                    format!("key {first} follows key {last} of an earlier leaf"),
                ));
            }
        }
        out.extend((0..n.nr()).map(|i| (n.keys[i], n.val(i).to_vec())));
        return Ok(());
    }
    for i in 0..n.nr() {
        collect(txn, n.child(i), vs, depth + 1, budget, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, HashMap, HashSet};
    use std::io;

    use crate::pdata::btree::Walker;
    use crate::pdata::io::{BlockDevice, OpenMode};
    use crate::pdata::space_map::DiskSpaceMap;
    use crate::thin::check::{check, CheckOptions};
    use crate::thin::device::{BlockTime, DeviceDetails};
    use crate::thin::dump::{
        dump, DeviceInfo, DumpOptions, Mapping, MetadataVisitor, SuperblockInfo,
    };
    use crate::thin::restore::{build_pool, BuildError, Overrides};
    use crate::thin::superblock::{read_superblock, Superblock};

    /// splitmix64.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// vblock -> (data block, time)
    type DevMap = BTreeMap<u64, (u64, u32)>;

    #[derive(Clone)]
    struct Dev {
        details: DeviceDetails,
        maps: DevMap,
    }

    /// A pool image of `meta_blocks` blocks built from `devs`.
    fn make_pool(
        meta_blocks: u64,
        nr_data_blocks: u64,
        time: u32,
        devs: &BTreeMap<u64, Dev>,
        metadata_snap: bool,
    ) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file()
            .set_len(meta_blocks * BLOCK_SIZE as u64)
            .unwrap();
        let dev = BlockDevice::open(f.path(), OpenMode::ReadWriteExclusive).unwrap();
        let feed = |b: &mut dyn MetadataVisitor| -> io::Result<()> {
            b.superblock_begin(&SuperblockInfo {
                uuid: String::new(),
                time: time as u64,
                transaction: 1,
                flags: 0,
                version: 2,
                data_block_size: 128,
                nr_data_blocks,
                metadata_snap: None,
            })?;
            for (&id, d) in devs {
                b.device_begin(&DeviceInfo {
                    dev_id: id,
                    mapped_blocks: d.details.mapped_blocks,
                    transaction: d.details.transaction_id,
                    creation_time: d.details.creation_time as u64,
                    snap_time: d.details.snapshotted_time as u64,
                })?;
                for (&v, &(data, t)) in &d.maps {
                    b.mapping(&Mapping {
                        origin_begin: v,
                        data_begin: data,
                        len: 1,
                        time: t,
                    })?;
                }
                b.device_end()?;
            }
            b.superblock_end()?;
            b.finish()
        };
        build_pool(&dev, Overrides::default(), metadata_snap, |b, _| {
            feed(b).map_err(|e| BuildError::Input(e.to_string()))
        })
        .unwrap();
        f
    }

    fn begin(dev: &BlockDevice) -> (Superblock, Transaction<'_>) {
        let sb = read_superblock(dev, 0).unwrap();
        let txn = Transaction::begin(dev, sb.data_sm(), sb.metadata_sm()).unwrap();
        (sb, txn)
    }

    fn commit(txn: Transaction, sb: Superblock) {
        txn.commit(|d, m| {
            Superblock {
                data_sm_root: Superblock::sm_root_bytes(d),
                metadata_sm_root: Superblock::sm_root_bytes(m),
                ..sb
            }
            .encode()
        })
        .unwrap();
    }

    /// Check the structure of the tree at `b`: nodes parse, non-root nodes
    /// at least a third full, keys strictly increasing and inside the
    /// parent's range, internal keys = children's first keys, leaves at one
    /// depth, max_entries as the kernel computes. Returns the height.
    fn check_tree(
        txn: &Transaction,
        b: u64,
        vs: usize,
        is_root: bool,
        lo: Option<u64>,
        hi: Option<u64>,
    ) -> usize {
        let data = txn.read(b).unwrap();
        let n = Node::parse(b, &data, vs).unwrap();
        let want_max = max_entries(if n.is_leaf() { vs } else { 8 });
        assert_eq!(n.max_entries(), want_max, "node {b}");
        if !is_root {
            assert!(
                n.nr_entries() >= n.max_entries() / 3,
                "node {b} underfull: {}",
                n.nr_entries()
            );
            assert!(n.nr_entries() > 0, "node {b} empty");
        }
        if !n.is_leaf() {
            assert!(n.nr_entries() >= if is_root { 2 } else { 1 }, "node {b}");
        }
        for k in n.keys() {
            if let Some(lo) = lo {
                assert!(k >= lo, "node {b}: key {k} below {lo}");
            }
            if let Some(hi) = hi {
                assert!(k < hi, "node {b}: key {k} not below {hi}");
            }
        }
        if n.is_leaf() {
            return 1;
        }
        let mut height = None;
        for i in 0..n.nr_entries() {
            let c = n.child(i);
            let cd = txn.read(c).unwrap();
            let cn = Node::parse(c, &cd, vs).unwrap();
            assert_eq!(cn.first_key(), Some(n.key(i)), "key {i} of node {b}");
            let next = if i + 1 < n.nr_entries() {
                Some(n.key(i + 1))
            } else {
                hi
            };
            let h = check_tree(txn, c, vs, false, Some(n.key(i)), next);
            assert_eq!(
                *height.get_or_insert(h),
                h,
                "leaves at different depths under {b}"
            );
        }
        height.unwrap() + 1
    }

    fn nonzero(txn: &Transaction) -> usize {
        (0..txn.device().nr_blocks())
            .filter(|&b| txn.meta_count(b) > 0)
            .count()
    }

    /// Expected counts of the nodes of the trees at `roots` (one reference
    /// per root handle, one per distinct parent).
    fn expected_counts(txn: &Transaction, roots: &[u64]) -> HashMap<u64, u32> {
        let mut want: HashMap<u64, u32> = HashMap::new();
        let mut seen = HashSet::new();
        let mut stack = Vec::new();
        for &r in roots {
            *want.entry(r).or_default() += 1;
            stack.push(r);
        }
        while let Some(b) = stack.pop() {
            if !seen.insert(b) {
                continue;
            }
            let data = txn.read(b).unwrap();
            let n = Node::parse(b, &data, 8).unwrap();
            if !n.is_leaf() {
                for i in 0..n.nr_entries() {
                    *want.entry(n.child(i)).or_default() += 1;
                    stack.push(n.child(i));
                }
            }
        }
        want
    }

    /// Everything about the trees (the live one and its clones) matches the
    /// models, every node's count is its number of references, and no block
    /// is leaked (`base` = counted blocks that are not ours). Returns the
    /// live tree's height.
    fn verify(
        txn: &Transaction,
        root: u64,
        model: &BTreeMap<u64, u64>,
        clones: &[(u64, BTreeMap<u64, u64>)],
        base: usize,
    ) -> usize {
        let mut height = 0;
        for (i, (r, m)) in std::iter::once((root, model))
            .chain(clones.iter().map(|(r, m)| (*r, m)))
            .enumerate()
        {
            let h = check_tree(txn, r, 8, true, None, None);
            if i == 0 {
                height = h;
            }
            let got: Vec<(u64, u64)> = entries(txn, r, 8)
                .unwrap()
                .into_iter()
                .map(|(k, v)| (k, le64(&v, 0)))
                .collect();
            let want: Vec<(u64, u64)> = m.iter().map(|(&k, &v)| (k, v)).collect();
            assert!(
                got == want,
                "tree {i} differs from its model ({} vs {} entries)",
                got.len(),
                want.len()
            );
        }
        let roots: Vec<u64> = std::iter::once(root)
            .chain(clones.iter().map(|c| c.0))
            .collect();
        let want = expected_counts(txn, &roots);
        for (&b, &c) in &want {
            assert_eq!(txn.meta_count(b), c, "count of node {b}");
        }
        assert_eq!(nonzero(txn), base + want.len(), "leaked or lost blocks");
        height
    }

    /// A key present in `m` near a random point (m not empty).
    fn some_key(rng: &mut Rng, m: &BTreeMap<u64, u64>, range: u64) -> u64 {
        let k = rng.below(range);
        match m.range(k..).next() {
            Some((&k, _)) => k,
            None => *m.keys().next().unwrap(),
        }
    }

    struct State<'a, 't> {
        txn: &'a mut Transaction<'t>,
        root: u64,
        model: BTreeMap<u64, u64>,
        clones: Vec<(u64, BTreeMap<u64, u64>)>,
        base: usize,
        max_height: usize,
        ops: u64,
    }

    impl State<'_, '_> {
        fn put(&mut self, k: u64, v: u64) {
            let (r, old) =
                insert(self.txn, self.root, k, &v.to_le_bytes(), ValueRefs::Nothing).unwrap();
            assert_eq!(
                old.map(|o| le64(&o, 0)),
                self.model.insert(k, v),
                "insert {k}"
            );
            self.root = r;
            self.ops += 1;
        }
        fn del(&mut self, k: u64) {
            let (r, old) = remove(self.txn, self.root, k, ValueRefs::Nothing).unwrap();
            assert_eq!(
                old.map(|o| le64(&o, 0)),
                self.model.remove(&k),
                "remove {k}"
            );
            self.root = r;
            self.ops += 1;
        }
        fn get(&self, k: u64) {
            let v = lookup(self.txn, self.root, k, 8).unwrap();
            assert_eq!(
                v.map(|o| le64(&o, 0)),
                self.model.get(&k).copied(),
                "lookup {k}"
            );
        }
        fn clone_tree(&mut self) {
            self.txn.inc(self.root);
            self.clones.push((self.root, self.model.clone()));
        }
        fn drop_clones(&mut self) {
            for (r, _) in std::mem::take(&mut self.clones) {
                self.txn.del_tree(r, &[ValueRefs::Nothing]).unwrap();
            }
        }
        fn verify(&mut self) {
            let h = verify(self.txn, self.root, &self.model, &self.clones, self.base);
            self.max_height = self.max_height.max(h);
        }
    }

    #[test]
    fn random_edits_match_a_model() {
        let devs = BTreeMap::from([(
            1,
            Dev {
                details: DeviceDetails {
                    mapped_blocks: 3,
                    ..Default::default()
                },
                maps: BTreeMap::from([(0, (0, 0)), (1, (1, 0)), (7, (2, 0))]),
            },
        )]);
        let f = make_pool(32768, 1000, 0, &devs, false);
        let dev = BlockDevice::open(f.path(), OpenMode::ReadWriteExclusive).unwrap();
        let mut rng = Rng(0x5eed_1234);
        let mut model = BTreeMap::new();
        let mut root = None;
        let mut max_height = 0;
        const BIG: u64 = 1 << 20;
        for round in 0..4 {
            let (sb, mut txn) = begin(&dev);
            let root0 = match root {
                Some(r) => r,
                None => empty_tree(&mut txn, 8).unwrap(),
            };
            // What was committed reads back with the right counts.
            let ours = expected_counts(&txn, &[root0]);
            for (&b, &c) in &ours {
                assert_eq!(txn.meta_count(b), c, "committed count of node {b}");
            }
            let base = nonzero(&txn) - ours.len();
            let mut s = State {
                txn: &mut txn,
                root: root0,
                model: std::mem::take(&mut model),
                clones: Vec::new(),
                base,
                max_height: 0,
                ops: 0,
            };
            s.verify();
            match round {
                0 => {
                    // Grow to 100k keys (height 3), a clone taken on the way.
                    while s.model.len() < 100_000 {
                        let k = rng.below(BIG);
                        let v = rng.next();
                        s.put(k, v);
                        if s.ops == 30_000 {
                            s.clone_tree();
                        }
                        if s.ops % 5000 == 0 {
                            s.get(rng.below(BIG));
                            s.verify();
                        }
                    }
                }
                1 => {
                    // Mixed edits on the big tree, with clones (share breaking).
                    for op in 0..40_000u64 {
                        match rng.below(10) {
                            0..=3 => {
                                let (k, v) = (rng.below(BIG), rng.next());
                                s.put(k, v)
                            }
                            4..=5 => {
                                let k = some_key(&mut rng, &s.model, BIG);
                                let v = rng.next();
                                s.put(k, v)
                            }
                            6 => {
                                let k = rng.below(BIG);
                                s.del(k)
                            }
                            _ => {
                                let k = some_key(&mut rng, &s.model, BIG);
                                s.del(k)
                            }
                        }
                        if op == 1000 || op == 20_000 {
                            s.clone_tree();
                        }
                        if op % 2000 == 0 {
                            s.get(rng.below(BIG));
                            s.verify();
                        }
                    }
                }
                2 => {
                    // Empty it in random order; the height falls back to 1.
                    while !s.model.is_empty() {
                        let k = some_key(&mut rng, &s.model, BIG);
                        s.del(k);
                        let n = s.model.len();
                        if n == 50_000 || n == 5000 {
                            s.clone_tree();
                        }
                        if n % 5000 == 0 || (n < 3000 && n % 50 == 0) || n < 20 {
                            s.verify();
                        }
                    }
                    s.verify();
                    assert_eq!(check_tree(s.txn, s.root, 8, true, None, None), 1);
                }
                _ => {
                    // A small key range: heights 1 and 2 in turn (root
                    // splits and collapses), many clones.
                    for op in 0..20_000u64 {
                        let k = rng.below(700);
                        if rng.below(2) == 0 && !s.model.is_empty() {
                            let k = some_key(&mut rng, &s.model, 700);
                            s.del(k);
                        } else if s.model.len() < 400 || rng.below(3) == 0 {
                            let v = rng.next();
                            s.put(k, v);
                        } else {
                            s.del(k);
                        }
                        if op % 997 == 0 {
                            s.clone_tree();
                        }
                        if op % 3001 == 0 {
                            s.drop_clones();
                        }
                        if op % 20 == 0 {
                            s.get(k);
                            s.verify();
                        }
                    }
                }
            }
            s.verify();
            s.drop_clones();
            s.verify();
            max_height = max_height.max(s.max_height);
            root = Some(s.root);
            model = s.model;
            commit(txn, sb);
        }
        assert!(max_height >= 3, "height reached {max_height}");
    }

    /// Data block counts the trees at `roots` imply: one per distinct leaf
    /// holding a block (a shared leaf counts once).
    fn expected_data_counts(txn: &Transaction, roots: &[u64]) -> BTreeMap<u64, u32> {
        let mut want = BTreeMap::new();
        let mut seen = HashSet::new();
        let mut stack = roots.to_vec();
        while let Some(b) = stack.pop() {
            if !seen.insert(b) {
                continue;
            }
            let data = txn.read(b).unwrap();
            let n = Node::parse(b, &data, 8).unwrap();
            for i in 0..n.nr_entries() {
                if n.is_leaf() {
                    *want.entry(n.value::<u64>(i) >> 24).or_default() += 1;
                } else {
                    stack.push(n.child(i));
                }
            }
        }
        want
    }

    #[test]
    fn merging_with_a_shared_sibling_keeps_counts() {
        let f = make_pool(8192, 100_000, 0, &BTreeMap::new(), false);
        let dev = BlockDevice::open(f.path(), OpenMode::ReadWriteExclusive).unwrap();
        let (_, mut txn) = begin(&dev);
        let txn = &mut txn;
        let base = nonzero(txn);
        let refs = ValueRefs::DataBlockTime;
        let val = |k: u64| ((k + 10) << 24) | 1;
        let mut model: BTreeMap<u64, u64> = BTreeMap::new();
        let mut r = empty_tree(txn, 8).unwrap();
        for k in 0..3000u64 {
            txn.data_inc(k + 10);
            r = insert(txn, r, k, &val(k).to_le_bytes(), refs).unwrap().0;
            model.insert(k, val(k));
        }
        // Every leaf down to exactly a third: any further removal merges.
        let third = (max_entries(8) / 3) as u64;
        let leaves: Vec<Vec<u64>> = {
            let mut out = Vec::new();
            let rd = txn.read(r).unwrap();
            let rn = Node::parse(r, &rd, 8).unwrap();
            assert!(!rn.is_leaf() && rn.nr_entries() > 3);
            for i in 0..rn.nr_entries() {
                let c = rn.child(i);
                let cd = txn.read(c).unwrap();
                out.push(Node::parse(c, &cd, 8).unwrap().keys().collect());
            }
            out
        };
        for keys in &leaves {
            for &k in &keys[third as usize..] {
                r = remove(txn, r, k, refs).unwrap().0;
                model.remove(&k);
            }
        }
        let check = |txn: &Transaction, roots: &[u64], models: &[&BTreeMap<u64, u64>]| {
            for (&r, m) in roots.iter().zip(models) {
                check_tree(txn, r, 8, true, None, None);
                let got: BTreeMap<u64, u64> = entries(txn, r, 8)
                    .unwrap()
                    .into_iter()
                    .map(|(k, v)| (k, le64(&v, 0)))
                    .collect();
                assert!(&&got == m);
            }
            let want = expected_counts(txn, roots);
            for (&b, &c) in &want {
                assert_eq!(txn.meta_count(b), c, "count of node {b}");
            }
            assert_eq!(nonzero(txn), base + want.len(), "leaked or lost blocks");
            let data = expected_data_counts(txn, roots);
            for b in 0..3100 {
                let want = data.get(&b).copied().unwrap_or(0);
                assert_eq!(txn.data_count(b), want, "count of data block {b}");
            }
        };
        check(txn, &[r], &[&model]);
        // Clone, then remove from the front: each leaf merges with an
        // untouched (shared) right sibling.
        txn.inc(r);
        let (clone, clone_model) = (r, model.clone());
        let keys: Vec<u64> = model.keys().copied().collect();
        for (i, k) in keys.iter().enumerate() {
            r = remove(txn, r, *k, refs).unwrap().0;
            model.remove(k);
            if i % 7 == 0 || i < 300 {
                check(txn, &[r, clone], &[&model, &clone_model]);
            }
        }
        check(txn, &[r, clone], &[&model, &clone_model]);
        txn.del_tree(clone, &[refs]).unwrap();
        check(txn, &[r], &[&model]);
        assert!(model.is_empty());
    }

    use crate::thin::dump::testutil::Collect;

    struct Scenario {
        _file: tempfile::NamedTempFile,
        dev: BlockDevice,
        before: Vec<u8>,
        after: Vec<u8>,
        old_in_use: fixedbitset::FixedBitSet,
        /// The devices before (as the held metadata snapshot keeps them) and after.
        initial: BTreeMap<u64, Dev>,
        devs: BTreeMap<u64, Dev>,
    }

    /// The thin pool's trees edited as the kernel edits them.
    struct Pool<'a, 't> {
        txn: &'a mut Transaction<'t>,
        top: u64,
        details: u64,
        devs: BTreeMap<u64, Dev>,
        time: u32,
        next_data: u64,
    }

    impl Pool<'_, '_> {
        fn alloc_data(&mut self) -> u64 {
            // Monotonic: never a block freed in this transaction.
            let b = self.txn.find_free_data(self.next_data).unwrap();
            assert!(b >= self.next_data);
            self.txn.data_inc(b);
            self.next_data = b + 1;
            b
        }

        /// Map (or remap) `vblocks` of `id` to new data blocks, one
        /// top-level update each (`batch` false) or all in one.
        fn write(&mut self, id: u64, vblocks: &[u64], batch: bool) {
            let mut news = Vec::new();
            for &v in vblocks {
                news.push((v, self.alloc_data()));
            }
            let time = self.time;
            let chunks: Vec<&[(u64, u64)]> = if batch {
                vec![&news[..]]
            } else {
                news.chunks(1).collect()
            };
            for chunk in chunks {
                let mut olds = Vec::new();
                self.top = update_subtree(self.txn, self.top, id, |txn, r| {
                    let mut r = r.expect("device exists");
                    for &(v, d) in chunk {
                        let bt = BlockTime { block: d, time }.pack();
                        let (nr, old) =
                            insert(txn, r, v, &bt.to_le_bytes(), ValueRefs::DataBlockTime)?;
                        olds.push(old.map(|o| BlockTime::unpack(le64(&o, 0))));
                        r = nr;
                    }
                    Ok(r)
                })
                .unwrap();
                let maps = &mut self.devs.get_mut(&id).unwrap().maps;
                for (&(v, d), old) in chunk.iter().zip(olds) {
                    let was = maps.insert(v, (d, time));
                    assert_eq!(old.map(|o| (o.block, o.time)), was, "old mapping of {v}");
                }
            }
        }

        fn unmap(&mut self, id: u64, vblocks: &[u64]) {
            let mut olds = Vec::new();
            self.top = update_subtree(self.txn, self.top, id, |txn, r| {
                let mut r = r.expect("device exists");
                for &v in vblocks {
                    let (nr, old) = remove(txn, r, v, ValueRefs::DataBlockTime)?;
                    olds.push(old.map(|o| BlockTime::unpack(le64(&o, 0))));
                    r = nr;
                }
                Ok(r)
            })
            .unwrap();
            let maps = &mut self.devs.get_mut(&id).unwrap().maps;
            for (v, old) in vblocks.iter().zip(olds) {
                assert_eq!(old.map(|o| (o.block, o.time)), maps.remove(v), "unmap {v}");
            }
        }

        /// Snapshot `origin` as `id`: the origin's root gains a reference
        /// and is inserted under the new id (lazy sharing).
        fn snapshot(&mut self, origin: u64, id: u64) {
            self.time += 1;
            let root = le64(&lookup(self.txn, self.top, origin, 8).unwrap().unwrap(), 0);
            self.txn.inc(root);
            let (top, old) = insert(
                self.txn,
                self.top,
                id,
                &root.to_le_bytes(),
                ValueRefs::MetadataRoot,
            )
            .unwrap();
            assert!(old.is_none());
            self.top = top;
            let o = self.devs.get_mut(&origin).unwrap();
            o.details.snapshotted_time = self.time;
            let details = DeviceDetails {
                mapped_blocks: o.maps.len() as u64,
                transaction_id: o.details.transaction_id,
                creation_time: self.time,
                snapshotted_time: self.time,
            };
            let maps = o.maps.clone();
            self.devs.insert(id, Dev { details, maps });
            self.sync_details();
        }

        fn delete(&mut self, id: u64) {
            let (top, old) = remove(self.txn, self.top, id, ValueRefs::MetadataRoot).unwrap();
            assert!(old.is_some());
            self.top = top;
            let (details, old) = remove(self.txn, self.details, id, ValueRefs::Nothing).unwrap();
            assert!(old.is_some());
            self.details = details;
            self.devs.remove(&id);
        }

        /// Write every device's details (mapped_blocks from the model).
        fn sync_details(&mut self) {
            for (&id, d) in self.devs.iter_mut() {
                d.details.mapped_blocks = d.maps.len() as u64;
                let (r, _) = insert(
                    self.txn,
                    self.details,
                    id,
                    &d.details.encode(),
                    ValueRefs::Nothing,
                )
                .unwrap();
                self.details = r;
                let got = lookup(self.txn, self.details, id, 24).unwrap().unwrap();
                assert_eq!(got, d.details.encode());
            }
        }

        fn some_mapped(&self, rng: &mut Rng, id: u64, n: usize) -> Vec<u64> {
            let keys: Vec<u64> = self.devs[&id].maps.keys().copied().collect();
            let mut out: Vec<u64> = Vec::new();
            while out.len() < n.min(keys.len()) {
                let k = keys[rng.below(keys.len() as u64) as usize];
                if !out.contains(&k) {
                    out.push(k);
                }
            }
            out
        }
    }

    fn thin_scenario() -> Scenario {
        let mut devs = BTreeMap::new();
        let maps1: DevMap = (0..600).map(|v| (v, (v, 0))).collect();
        let maps2: DevMap = (0..300).map(|v| (v * 3, (1000 + v, 1))).collect();
        for (id, maps) in [(1u64, maps1), (2, maps2)] {
            let details = DeviceDetails {
                mapped_blocks: maps.len() as u64,
                transaction_id: 0,
                creation_time: 0,
                snapshotted_time: 0,
            };
            devs.insert(id, Dev { details, maps });
        }
        // With a held metadata snapshot: the top-level and details roots are
        // shared from the start, so the first edits break that sharing (the
        // top-level leaf's subtree roots gain references).
        let f = make_pool(4096, 50_000, 1, &devs, true);
        let initial = devs.clone();
        let dev = BlockDevice::open(f.path(), OpenMode::ReadWriteExclusive).unwrap();
        let before = std::fs::read(f.path()).unwrap();
        let (sb, mut txn) = begin(&dev);
        let old_in_use = {
            let mut w = Walker::new(&dev);
            let (sm, errs) = DiskSpaceMap::load_metadata(&mut w, sb.metadata_sm());
            assert!(errs.is_empty());
            sm.in_use(&dev).unwrap()
        };
        let mut rng = Rng(77);
        let mut p = Pool {
            txn: &mut txn,
            top: sb.mapping_root,
            details: sb.details_root,
            devs,
            time: sb.time,
            next_data: 2000,
        };

        // Device 1: new mappings (bottom tree grows), remaps, unmaps.
        let mut fresh: Vec<u64> = (1000..3000).collect();
        for i in (1..fresh.len()).rev() {
            fresh.swap(i, rng.below(i as u64 + 1) as usize);
        }
        p.write(1, &fresh[..300], false);
        p.write(1, &fresh[300..], true);
        let remap = p.some_mapped(&mut rng, 1, 100);
        p.write(1, &remap, false);
        let mut gone = p.some_mapped(&mut rng, 1, 150);
        gone.extend(1200..1500); // a leaf's worth and more, in a row
        gone.sort_unstable();
        gone.dedup();
        p.unmap(1, &gone);
        p.sync_details();

        // Snapshot 1 -> 3, then write to the origin: shared nodes are shadowed.
        p.snapshot(1, 3);
        let mut news: Vec<u64> = (5000..5400).collect();
        news.extend(p.some_mapped(&mut rng, 1, 120));
        p.write(1, &news, true);
        let gone = p.some_mapped(&mut rng, 1, 200);
        p.unmap(1, &gone);
        p.unmap(1, &(0..100).collect::<Vec<_>>());

        // Device 2 goes (its tree is freed, data released).
        p.delete(2);

        // Snapshot of the snapshot; the first one deleted (a shared tree:
        // only its root loses a reference); writes to the second.
        p.snapshot(3, 4);
        p.delete(3);
        let remap = p.some_mapped(&mut rng, 4, 50);
        p.write(4, &remap, false);
        p.unmap(4, &(500..560).collect::<Vec<_>>());
        p.write(1, &(9000..9010).collect::<Vec<_>>(), false);
        p.sync_details();

        let (top, details, time, devs) = (p.top, p.details, p.time, std::mem::take(&mut p.devs));
        assert!(
            std::fs::read(f.path()).unwrap() == before,
            "the transaction wrote before its commit"
        );
        txn.commit(|d, m| {
            Superblock {
                time,
                transaction_id: sb.transaction_id + 1,
                mapping_root: top,
                details_root: details,
                data_sm_root: Superblock::sm_root_bytes(d),
                metadata_sm_root: Superblock::sm_root_bytes(m),
                ..sb.clone()
            }
            .encode()
        })
        .unwrap();
        let after = std::fs::read(f.path()).unwrap();
        Scenario {
            _file: f,
            dev,
            before,
            after,
            old_in_use,
            initial,
            devs,
        }
    }

    #[test]
    fn thin_edits_pass_check_and_dump_as_modelled() {
        let s = thin_scenario();
        let report = check(&s.dev, &CheckOptions::default(), &mut |_, _| {});
        assert!(report.findings.is_empty(), "{:#?}", report.findings);
        assert_ne!(report.superblock.unwrap().metadata_snap, 0);
        let mut c = Collect::default();
        dump(&s.dev, &DumpOptions::default(), &mut c, &mut |_, _| {}).unwrap();
        same_devices(&c, &s.devs);
        // The metadata snapshot still shows the pool as it was.
        let mut c = Collect::default();
        let opts = DumpOptions {
            metadata_snap: Some(None),
            ..Default::default()
        };
        dump(&s.dev, &opts, &mut c, &mut |_, _| {}).unwrap();
        same_devices(&c, &s.initial);
        // The scenario did share: device 4 kept mappings device 1 lost.
        assert!(s.devs[&4].maps.contains_key(&50) && !s.devs[&1].maps.contains_key(&50));
    }

    fn same_devices(c: &Collect, devs: &BTreeMap<u64, Dev>) {
        assert_eq!(
            c.devs.keys().collect::<Vec<_>>(),
            devs.keys().collect::<Vec<_>>()
        );
        for (id, d) in devs {
            let (info, maps) = &c.devs[id];
            let maps: DevMap = maps.iter().map(|&(v, b, t)| (v, (b, t))).collect();
            assert!(maps == d.maps, "mappings of device {id}");
            assert_eq!(info.mapped_blocks, d.details.mapped_blocks, "device {id}");
            assert_eq!(info.creation_time, d.details.creation_time as u64);
            assert_eq!(info.snap_time, d.details.snapshotted_time as u64);
        }
    }

    #[test]
    fn thin_commit_writes_only_blocks_the_old_metadata_left_free() {
        let s = thin_scenario();
        let mut changed = 0;
        for (b, (x, y)) in s
            .before
            .chunks(BLOCK_SIZE)
            .zip(s.after.chunks(BLOCK_SIZE))
            .enumerate()
        {
            if b == 0 || x == y {
                continue;
            }
            changed += 1;
            assert!(
                !s.old_in_use.contains(b),
                "block {b} of the old metadata was overwritten"
            );
        }
        assert!(changed > 10);
        assert!(s.before[..BLOCK_SIZE] != s.after[..BLOCK_SIZE]);
    }

    #[test]
    fn corrupt_nodes_are_errors() {
        let devs = BTreeMap::new();
        let f = make_pool(1024, 100, 0, &devs, false);
        let dev = BlockDevice::open(f.path(), OpenMode::ReadWriteExclusive).unwrap();
        let (_, mut txn) = begin(&dev);
        let mut r = empty_tree(&mut txn, 8).unwrap();
        for k in 0..1000u64 {
            r = insert(&mut txn, r, k, &k.to_le_bytes(), ValueRefs::Nothing)
                .unwrap()
                .0;
        }
        // A wrong value size is refused before anything changes.
        assert!(insert(&mut txn, r, 5, &[0; 24], ValueRefs::Nothing).is_err());
        assert!(lookup(&txn, r, 5, 24).is_err());
        // A damaged child: lookups, inserts, removes and listing fail, naming it.
        let data = txn.read(r).unwrap();
        let child = Node::parse(r, &data, 8).unwrap().child(1);
        txn.block_mut(child).unwrap()[100] ^= 1;
        let key = Node::parse(r, &data, 8).unwrap().key(1);
        assert_eq!(lookup(&txn, r, key, 8).unwrap_err().block(), Some(child));
        assert_eq!(entries(&txn, r, 8).unwrap_err().block(), Some(child));
        assert!(insert(&mut txn, r, key + 1, &[0; 8], ValueRefs::Nothing).is_err());
        assert!(remove(&mut txn, r, key, ValueRefs::Nothing).is_err());
        // A block that is no node at all.
        assert!(lookup(&txn, 0, 1, 8).is_err());
        assert!(remove(&mut txn, 0, 1, ValueRefs::Nothing).is_err());
    }
}
