//! The thin-pool target's messages, applied offline to an inactive metadata
//! device with the kernel's semantics (dm-thin-metadata.c), each as one
//! crash-safe transaction: new blocks are written where the committed
//! metadata has nothing, then the superblock.
//!
//! - `create_thin ID`: an empty mapping tree and details (mapped 0, the
//!   pool's transaction id, created and snapshotted at the pool's time).
//! - `create_snap ID ORIGIN`: the origin's mapping root is shared (one more
//!   reference, nothing copied: sharing is broken lazily on write), the pool
//!   time goes up by one, and both devices are marked snapshotted at the new
//!   time; the snapshot takes the origin's mapped_blocks.
//! - `delete ID`: the device's details go, and its mapping tree loses a
//!   reference; a tree (or subtree) nobody else references is freed, with
//!   the data blocks its leaves held.
//! - `set_transaction_id OLD NEW`.
//! - `reserve_metadata_snap`: a copy of the superblock, without space maps,
//!   holding one more reference to the two trees' roots.
//! - `release_metadata_snap`: the copy's trees lose that reference (freed
//!   where nothing else holds them), and the copy is freed.

use crate::pdata::btree::{empty_tree, insert, lookup, remove};
use crate::pdata::checksum::BlockKind;
use crate::pdata::io::BlockDevice;
use crate::pdata::txn::{Transaction, ValueRefs};
use crate::pdata::{self, le64};
use crate::thin::device::DeviceDetails;
use crate::thin::superblock::{read_superblock, Superblock, SUPERBLOCK_LOCATION};

/// Thin device ids are 24 bits wide (the kernel's limit).
pub const MAX_DEV_ID: u64 = (1 << 24) - 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    CreateThin(u64),
    CreateSnap { id: u64, origin: u64 },
    Delete(u64),
    SetTransactionId { old: u64, new: u64 },
    ReserveMetadataSnap,
    ReleaseMetadataSnap,
}

#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    /// The message itself is malformed.
    #[error("{0}")]
    Usage(String),
    /// The kernel would refuse it (the errno it would give, in words).
    #[error("{0}")]
    Refused(String),
    /// The metadata is damaged: changing it in place could make it worse.
    #[error("{0}")]
    Unsound(String),
    /// The superblock says the metadata needs checking first.
    #[error("the metadata has needs_check set: run thin_check (and thin_repair) first")]
    NeedsCheck,
    #[error(transparent)]
    Metadata(#[from] pdata::Error),
}

fn number(what: &str, s: &str) -> Result<u64, MessageError> {
    s.parse::<u64>()
        .map_err(|_| MessageError::Usage(format!("{what} '{s}' is not a number")))
}

fn dev_id(s: &str) -> Result<u64, MessageError> {
    let id = number("device id", s)?;
    if id > MAX_DEV_ID {
        return Err(MessageError::Usage(format!(
            "device id {id} is above the limit of {MAX_DEV_ID} (24 bits)"
        )));
    }
    Ok(id)
}

impl Message {
    /// Parse a message as given to `dmsetup message POOL 0 ...`.
    pub fn parse(words: &[String]) -> Result<Message, MessageError> {
        let args: Vec<&str> = words.iter().map(String::as_str).collect();
        let usage = |m: &str| Err(MessageError::Usage(format!("usage: {m}")));
        match args.as_slice() {
            ["create_thin", id] => Ok(Message::CreateThin(dev_id(id)?)),
            ["create_thin", ..] => usage("create_thin ID"),
            ["create_snap", id, origin] => Ok(Message::CreateSnap {
                id: dev_id(id)?,
                origin: dev_id(origin)?,
            }),
            ["create_snap", ..] => usage("create_snap ID ORIGIN_ID"),
            ["delete", id] => Ok(Message::Delete(dev_id(id)?)),
            ["delete", ..] => usage("delete ID"),
            ["set_transaction_id", old, new] => Ok(Message::SetTransactionId {
                old: number("transaction id", old)?,
                new: number("transaction id", new)?,
            }),
            ["set_transaction_id", ..] => usage("set_transaction_id OLD_ID NEW_ID"),
            ["reserve_metadata_snap"] => Ok(Message::ReserveMetadataSnap),
            ["release_metadata_snap"] => Ok(Message::ReleaseMetadataSnap),
            ["reserve_metadata_snap" | "release_metadata_snap", ..] => {
                usage(&format!("{} (no arguments)", args[0]))
            }
            [] => Err(MessageError::Usage("no message given".into())),
            [other, ..] => Err(MessageError::Usage(format!(
                "unknown message '{other}' (create_thin, create_snap, delete, set_transaction_id, reserve_metadata_snap, release_metadata_snap)"
            ))),
        }
    }
}

fn details(txn: &Transaction, root: u64, id: u64) -> Result<Option<DeviceDetails>, MessageError> {
    Ok(crate::thin::device::lookup_details(txn, root, id)?)
}

fn mapping_root(txn: &Transaction, top: u64, id: u64) -> Result<Option<u64>, MessageError> {
    Ok(lookup(txn, top, id, 8)?.map(|v| le64(&v, 0)))
}

/// Apply `msg` to the inactive metadata on `dev` (opened read-write and
/// exclusive) in one transaction. Returns the committed superblock.
pub fn apply(dev: &BlockDevice, msg: Message) -> Result<Superblock, MessageError> {
    let sb = read_superblock(dev, SUPERBLOCK_LOCATION)?;
    if sb.needs_check() {
        return Err(MessageError::NeedsCheck);
    }
    crate::thin::check::require_sound(dev).map_err(MessageError::Unsound)?;
    let mut txn = Transaction::begin(dev, sb.data_sm(), sb.metadata_sm())?;
    let mut new = sb.clone();
    match msg {
        Message::CreateThin(id) => {
            if details(&txn, new.details_root, id)?.is_some() {
                return Err(MessageError::Refused(format!("device {id} already exists")));
            }
            let root = empty_tree(&mut txn, 8)?;
            new.mapping_root = insert(
                &mut txn,
                new.mapping_root,
                id,
                &root.to_le_bytes(),
                ValueRefs::MetadataRoot,
            )?
            .0;
            let d = DeviceDetails {
                mapped_blocks: 0,
                transaction_id: new.transaction_id,
                creation_time: new.time,
                snapshotted_time: new.time,
            };
            new.details_root = insert(
                &mut txn,
                new.details_root,
                id,
                &d.encode(),
                ValueRefs::Nothing,
            )?
            .0;
        }
        Message::CreateSnap { id, origin } => {
            if details(&txn, new.details_root, id)?.is_some() {
                return Err(MessageError::Refused(format!("device {id} already exists")));
            }
            let Some(mut od) = details(&txn, new.details_root, origin)? else {
                return Err(MessageError::Refused(format!(
                    "origin device {origin} does not exist"
                )));
            };
            let Some(root) = mapping_root(&txn, new.mapping_root, origin)? else {
                return Err(MessageError::Refused(format!(
                    "origin device {origin} has no mapping tree"
                )));
            };
            // The snapshot shares the origin's tree: one more reference.
            txn.inc(root);
            new.mapping_root = insert(
                &mut txn,
                new.mapping_root,
                id,
                &root.to_le_bytes(),
                ValueRefs::MetadataRoot,
            )?
            .0;
            new.time = new.time.wrapping_add(1);
            od.snapshotted_time = new.time;
            let sd = DeviceDetails {
                mapped_blocks: od.mapped_blocks,
                transaction_id: new.transaction_id,
                creation_time: new.time,
                snapshotted_time: new.time,
            };
            new.details_root = insert(
                &mut txn,
                new.details_root,
                origin,
                &od.encode(),
                ValueRefs::Nothing,
            )?
            .0;
            new.details_root = insert(
                &mut txn,
                new.details_root,
                id,
                &sd.encode(),
                ValueRefs::Nothing,
            )?
            .0;
        }
        Message::Delete(id) => {
            let (root, d) = remove(&mut txn, new.details_root, id, ValueRefs::Nothing)?;
            if d.is_none() {
                return Err(MessageError::Refused(format!("device {id} does not exist")));
            }
            new.details_root = root;
            // Releasing the top-level value deletes the device's tree as
            // far as nothing else (a snapshot, the metadata snapshot) holds it.
            new.mapping_root = remove(&mut txn, new.mapping_root, id, ValueRefs::MetadataRoot)?.0;
        }
        Message::SetTransactionId { old, new: id } => {
            if new.transaction_id != old {
                return Err(MessageError::Refused(format!(
                    "the transaction id is {}, not {old}",
                    new.transaction_id
                )));
            }
            new.transaction_id = id;
        }
        Message::ReserveMetadataSnap => {
            if new.metadata_snap != 0 {
                return Err(MessageError::Refused(format!(
                    "a metadata snapshot already exists (block {})",
                    new.metadata_snap
                )));
            }
            let b = txn.alloc(BlockKind::ThinSuperblock)?;
            let copy = Superblock {
                location: b,
                metadata_snap: 0,
                data_sm_root: [0; 128],
                metadata_sm_root: [0; 128],
                ..new.clone()
            };
            txn.block_mut(b)?.copy_from_slice(&copy.encode());
            txn.inc(new.mapping_root);
            txn.inc(new.details_root);
            new.metadata_snap = b;
        }
        Message::ReleaseMetadataSnap => {
            let b = new.metadata_snap;
            if b == 0 {
                return Err(MessageError::Refused(
                    "there is no metadata snapshot to release".into(),
                ));
            }
            let copy = read_superblock(dev, b)?;
            txn.del_tree(
                copy.mapping_root,
                &[ValueRefs::MetadataRoot, ValueRefs::DataBlockTime],
            )?;
            txn.del_tree(copy.details_root, &[ValueRefs::Nothing])?;
            txn.dec(b)?;
            new.metadata_snap = 0;
        }
    }
    Ok(crate::thin::superblock::commit_transaction(txn, new)?)
}
