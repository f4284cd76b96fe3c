//! The thin-pool superblock (block 0; a metadata snapshot keeps a copy elsewhere).

use crate::pdata::checksum::{self, BlockKind};
use crate::pdata::error::{Error, Result};
use crate::pdata::io::BlockDevice;
use crate::pdata::space_map::{SmRoot, SM_ROOT_SIZE};
use crate::pdata::{le32, le64, BLOCK_SIZE};

pub const SUPERBLOCK_LOCATION: u64 = 0;
pub const THIN_SUPERBLOCK_MAGIC: u64 = 27022010;
pub const NEEDS_CHECK_FLAG: u32 = 1;
/// Kernels write version 2; version 1 metadata is still readable.
pub const SUPPORTED_VERSIONS: [u32; 2] = [1, 2];
pub const METADATA_BLOCK_SIZE_SECTORS: u32 = 8;

const OFF_FLAGS: usize = 4;
const OFF_BLOCKNR: usize = 8;
const OFF_UUID: usize = 16;
const OFF_MAGIC: usize = 32;
const OFF_VERSION: usize = 40;
const OFF_TIME: usize = 44;
const OFF_TRANS_ID: usize = 48;
const OFF_HELD_ROOT: usize = 56;
const OFF_DATA_SM_ROOT: usize = 64;
const OFF_METADATA_SM_ROOT: usize = 192;
const OFF_MAPPING_ROOT: usize = 320;
const OFF_DETAILS_ROOT: usize = 328;
const OFF_DATA_BLOCK_SIZE: usize = 336;
const OFF_METADATA_BLOCK_SIZE: usize = 340;
const OFF_METADATA_NR_BLOCKS: usize = 344;
const OFF_COMPAT: usize = 352;
const OFF_COMPAT_RO: usize = 356;
const OFF_INCOMPAT: usize = 360;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Where this superblock was read from (0, or a metadata snapshot's block).
    pub location: u64,
    pub flags: u32,
    pub uuid: [u8; 16],
    pub version: u32,
    pub time: u32,
    pub transaction_id: u64,
    /// Block of the metadata snapshot's superblock copy, 0 for none.
    pub metadata_snap: u64,
    pub data_sm_root: [u8; SM_ROOT_SIZE],
    pub metadata_sm_root: [u8; SM_ROOT_SIZE],
    pub mapping_root: u64,
    pub details_root: u64,
    /// Data block size in 512-byte sectors.
    pub data_block_size: u32,
    pub metadata_block_size: u32,
    pub metadata_nr_blocks: u64,
    pub compat_flags: u32,
    pub compat_ro_flags: u32,
    pub incompat_flags: u32,
}

impl Superblock {
    /// Validate and decode the superblock stored in `data` (the block at `loc`):
    /// checksum, location, magic, version, feature flags (any unknown bit is
    /// refused, as the kernel refuses to open such metadata read-write) and block sizes.
    pub fn parse(loc: u64, data: &[u8]) -> Result<Superblock> {
        if data[..64].iter().all(|&b| b == 0) {
            return Err(Error::invalid(
                loc,
                "bad checksum in superblock: the block is all zeros (no thin superblock; unformatted metadata?)",
            ));
        }
        checksum::validate(loc, data, BlockKind::ThinSuperblock)?;
        let magic = le64(data, OFF_MAGIC);
        if magic != THIN_SUPERBLOCK_MAGIC {
            return Err(Error::invalid(
                loc,
                format!("bad superblock magic {magic} (expected {THIN_SUPERBLOCK_MAGIC})"),
            ));
        }
        let sb = Superblock {
            location: loc,
            flags: le32(data, OFF_FLAGS),
            uuid: data[OFF_UUID..OFF_UUID + 16].try_into().unwrap(),
            version: le32(data, OFF_VERSION),
            time: le32(data, OFF_TIME),
            transaction_id: le64(data, OFF_TRANS_ID),
            metadata_snap: le64(data, OFF_HELD_ROOT),
            data_sm_root: data[OFF_DATA_SM_ROOT..OFF_DATA_SM_ROOT + SM_ROOT_SIZE]
                .try_into()
                .unwrap(),
            metadata_sm_root: data[OFF_METADATA_SM_ROOT..OFF_METADATA_SM_ROOT + SM_ROOT_SIZE]
                .try_into()
                .unwrap(),
            mapping_root: le64(data, OFF_MAPPING_ROOT),
            details_root: le64(data, OFF_DETAILS_ROOT),
            data_block_size: le32(data, OFF_DATA_BLOCK_SIZE),
            metadata_block_size: le32(data, OFF_METADATA_BLOCK_SIZE),
            metadata_nr_blocks: le64(data, OFF_METADATA_NR_BLOCKS),
            compat_flags: le32(data, OFF_COMPAT),
            compat_ro_flags: le32(data, OFF_COMPAT_RO),
            incompat_flags: le32(data, OFF_INCOMPAT),
        };
        if !SUPPORTED_VERSIONS.contains(&sb.version) {
            return Err(Error::invalid(
                loc,
                format!("unsupported metadata version {}", sb.version),
            ));
        }
        if sb.incompat_flags != 0 {
            return Err(Error::invalid(loc, format!("unknown incompatible feature flags {:#x}: the kernel refuses to open this metadata", sb.incompat_flags)));
        }
        if sb.compat_ro_flags != 0 {
            return Err(Error::invalid(loc, format!("unknown read-only-compatible feature flags {:#x}: the kernel only opens this metadata read-only", sb.compat_ro_flags)));
        }
        if sb.metadata_block_size != METADATA_BLOCK_SIZE_SECTORS {
            return Err(Error::invalid(
                loc,
                format!(
                    "metadata block size is {} sectors; only 8 (4 KiB) exists",
                    sb.metadata_block_size
                ),
            ));
        }
        let dbs = sb.data_block_size;
        if !(128..=2_097_152).contains(&dbs) || dbs % 128 != 0 {
            return Err(Error::invalid(loc, format!("data block size {dbs} sectors is not a multiple of 128 between 128 and 2097152")));
        }
        if sb.flags & !NEEDS_CHECK_FLAG != 0 {
            return Err(Error::invalid(
                loc,
                format!("unknown superblock flags {:#x}", sb.flags),
            ));
        }
        Ok(sb)
    }

    pub fn needs_check(&self) -> bool {
        self.flags & NEEDS_CHECK_FLAG != 0
    }

    pub fn data_sm(&self) -> SmRoot {
        SmRoot::parse(&self.data_sm_root)
    }

    pub fn metadata_sm(&self) -> SmRoot {
        SmRoot::parse(&self.metadata_sm_root)
    }
}

/// Read and validate the superblock at `loc`.
pub fn read_superblock(dev: &BlockDevice, loc: u64) -> Result<Superblock> {
    let mut buf = vec![0u8; BLOCK_SIZE];
    dev.read_block(loc, &mut buf)?;
    Superblock::parse(loc, &buf)
}

impl Superblock {
    /// The sealed 4 KiB block of this superblock, stored at `self.location`.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        let put32 =
            |b: &mut [u8], off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_le_bytes());
        let put64 =
            |b: &mut [u8], off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_le_bytes());
        put32(&mut b, OFF_FLAGS, self.flags);
        put64(&mut b, OFF_BLOCKNR, self.location);
        b[OFF_UUID..OFF_UUID + 16].copy_from_slice(&self.uuid);
        put64(&mut b, OFF_MAGIC, THIN_SUPERBLOCK_MAGIC);
        put32(&mut b, OFF_VERSION, self.version);
        put32(&mut b, OFF_TIME, self.time);
        put64(&mut b, OFF_TRANS_ID, self.transaction_id);
        put64(&mut b, OFF_HELD_ROOT, self.metadata_snap);
        b[OFF_DATA_SM_ROOT..OFF_DATA_SM_ROOT + SM_ROOT_SIZE].copy_from_slice(&self.data_sm_root);
        b[OFF_METADATA_SM_ROOT..OFF_METADATA_SM_ROOT + SM_ROOT_SIZE]
            .copy_from_slice(&self.metadata_sm_root);
        put64(&mut b, OFF_MAPPING_ROOT, self.mapping_root);
        put64(&mut b, OFF_DETAILS_ROOT, self.details_root);
        put32(&mut b, OFF_DATA_BLOCK_SIZE, self.data_block_size);
        put32(&mut b, OFF_METADATA_BLOCK_SIZE, self.metadata_block_size);
        put64(&mut b, OFF_METADATA_NR_BLOCKS, self.metadata_nr_blocks);
        put32(&mut b, OFF_COMPAT, self.compat_flags);
        put32(&mut b, OFF_COMPAT_RO, self.compat_ro_flags);
        put32(&mut b, OFF_INCOMPAT, self.incompat_flags);
        checksum::seal(&mut b, BlockKind::ThinSuperblock);
        b
    }

    /// An sm root field as stored (32 meaningful bytes, zero padding).
    pub fn sm_root_bytes(root: &SmRoot) -> [u8; SM_ROOT_SIZE] {
        let mut b = [0u8; SM_ROOT_SIZE];
        root.encode(&mut b);
        b
    }
}

/// Commit `txn` with `sb` as the new superblock (its space-map roots
/// filled in from the space maps the commit writes). Returns what was written.
pub fn commit_transaction(
    txn: crate::pdata::txn::Transaction,
    sb: Superblock,
) -> Result<Superblock> {
    let mut committed = sb;
    txn.commit(|data_sm, metadata_sm| {
        committed.data_sm_root = Superblock::sm_root_bytes(data_sm);
        committed.metadata_sm_root = Superblock::sm_root_bytes(metadata_sm);
        committed.encode()
    })?;
    Ok(committed)
}

/// Rewrite the flags word of a superblock block in place and reseal it.
/// Only the flags and checksum change, within the first 512-byte sector.
pub fn set_flags(block: &mut [u8], flags: u32) {
    block[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&flags.to_le_bytes());
    checksum::seal(block, BlockKind::ThinSuperblock);
}

#[cfg(test)]
pub(crate) mod testutil {
    use super::*;

    /// A minimal valid superblock block.
    pub fn build(loc: u64) -> Vec<u8> {
        let mut b = vec![0u8; BLOCK_SIZE];
        b[OFF_BLOCKNR..OFF_BLOCKNR + 8].copy_from_slice(&loc.to_le_bytes());
        b[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&THIN_SUPERBLOCK_MAGIC.to_le_bytes());
        b[OFF_VERSION..OFF_VERSION + 4].copy_from_slice(&2u32.to_le_bytes());
        b[OFF_DATA_BLOCK_SIZE..OFF_DATA_BLOCK_SIZE + 4].copy_from_slice(&128u32.to_le_bytes());
        b[OFF_METADATA_BLOCK_SIZE..OFF_METADATA_BLOCK_SIZE + 4]
            .copy_from_slice(&8u32.to_le_bytes());
        checksum::seal(&mut b, BlockKind::ThinSuperblock);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_is_the_inverse_of_parse() {
        let mut sb = Superblock::parse(0, &testutil::build(0)).unwrap();
        sb.time = 7;
        sb.transaction_id = 9;
        sb.metadata_snap = 33;
        sb.mapping_root = 5;
        sb.details_root = 6;
        sb.metadata_nr_blocks = 1024;
        sb.data_sm_root[0] = 1;
        let b = sb.encode();
        assert_eq!(Superblock::parse(0, &b).unwrap(), sb);
    }

    #[test]
    fn parses_a_valid_superblock() {
        let b = testutil::build(0);
        let sb = Superblock::parse(0, &b).unwrap();
        assert_eq!(sb.version, 2);
        assert_eq!(sb.data_block_size, 128);
        assert!(!sb.needs_check());
    }

    #[test]
    fn every_single_byte_corruption_is_refused_without_panic() {
        let good = testutil::build(0);
        for off in 0..BLOCK_SIZE {
            let mut b = good.clone();
            b[off] ^= 0x5a;
            assert!(Superblock::parse(0, &b).is_err(), "offset {off}");
        }
    }

    #[test]
    fn feature_flags_and_sizes_are_checked() {
        for (off, val) in [
            (OFF_INCOMPAT, 1u32),
            (OFF_COMPAT_RO, 2),
            (OFF_VERSION, 3),
            (OFF_DATA_BLOCK_SIZE, 100),
            (OFF_METADATA_BLOCK_SIZE, 16),
        ] {
            let mut b = testutil::build(0);
            b[off..off + 4].copy_from_slice(&val.to_le_bytes());
            checksum::seal(&mut b, BlockKind::ThinSuperblock);
            assert!(Superblock::parse(0, &b).is_err(), "offset {off}");
        }
        assert!(Superblock::parse(5, &testutil::build(0)).is_err());
        assert!(Superblock::parse(0, &vec![0u8; BLOCK_SIZE])
            .unwrap_err()
            .to_string()
            .contains("all zeros"));
    }

    #[test]
    fn needs_check_flag_round_trips() {
        let mut b = testutil::build(0);
        set_flags(&mut b, NEEDS_CHECK_FLAG);
        assert!(Superblock::parse(0, &b).unwrap().needs_check());
        set_flags(&mut b, 0);
        assert!(!Superblock::parse(0, &b).unwrap().needs_check());
    }
}
