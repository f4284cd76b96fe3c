//! Block checksums: crc32c (see [`super::crc`]) over bytes 4..4096, xor'd with
//! a per-kind salt.
//!
//! The kernel computes `crc32c(~0, data) ^ salt` with no final inversion; with
//! the standard CRC-32C (final xor 0xffffffff) that is `std ^ 0xffffffff ^ salt`.

use std::fmt;

use super::BLOCK_SIZE;

/// The kinds of metadata block, each with its checksum salt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    ThinSuperblock,
    BTreeNode,
    Bitmap,
    MetadataIndex,
}

impl BlockKind {
    pub const ALL: [BlockKind; 4] = [
        BlockKind::ThinSuperblock,
        BlockKind::BTreeNode,
        BlockKind::Bitmap,
        BlockKind::MetadataIndex,
    ];

    pub const fn salt(self) -> u32 {
        match self {
            BlockKind::ThinSuperblock => 160774,
            BlockKind::BTreeNode => 121107,
            BlockKind::Bitmap => 240779,
            BlockKind::MetadataIndex => 160478,
        }
    }
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BlockKind::ThinSuperblock => "thin superblock",
            BlockKind::BTreeNode => "btree node",
            BlockKind::Bitmap => "space map bitmap",
            BlockKind::MetadataIndex => "metadata space map index",
        })
    }
}

/// The checksum the kernel stores for `block` (4096 bytes) of kind `kind`.
#[inline]
pub fn compute(block: &[u8], kind: BlockKind) -> u32 {
    super::crc::crc32c(&block[4..BLOCK_SIZE]) ^ 0xffff_ffff ^ kind.salt()
}

/// The stored checksum (first 4 bytes).
#[inline]
pub fn stored(block: &[u8]) -> u32 {
    u32::from_le_bytes(block[0..4].try_into().unwrap())
}

/// True when the stored checksum is right for `kind`.
#[inline]
pub fn verify(block: &[u8], kind: BlockKind) -> bool {
    stored(block) == compute(block, kind)
}

/// Which kind's checksum, if any, the block carries (for error messages).
pub fn identify(block: &[u8]) -> Option<BlockKind> {
    let raw = super::crc::crc32c(&block[4..BLOCK_SIZE]) ^ 0xffff_ffff ^ stored(block);
    BlockKind::ALL.into_iter().find(|k| k.salt() == raw)
}

/// Validate a metadata block of `kind` read from `loc`: its checksum, then
/// its self-reference (`blocknr` at offset 8), as the kernel's validators do.
pub fn validate(loc: u64, block: &[u8], kind: BlockKind) -> crate::pdata::Result<()> {
    use crate::pdata::error::{Error, Problem};
    if !verify(block, kind) {
        return Err(Error::corrupt(
            loc,
            Problem::BadChecksum {
                expected: kind,
                found: identify(block),
            },
        ));
    }
    let nr = u64::from_le_bytes(block[8..16].try_into().unwrap());
    if nr != loc {
        return Err(Error::corrupt(loc, Problem::WrongLocation { found: nr }));
    }
    Ok(())
}

/// Write the right checksum for `kind` into the first 4 bytes.
pub fn seal(block: &mut [u8], kind: BlockKind) {
    let c = compute(block, kind);
    block[0..4].copy_from_slice(&c.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_block_checksums_differ_by_salt_only() {
        let b = vec![0u8; BLOCK_SIZE];
        let base = crc32c::crc32c(&b[4..]) ^ 0xffff_ffff;
        for k in BlockKind::ALL {
            assert_eq!(compute(&b, k), base ^ k.salt());
        }
    }

    #[test]
    fn seal_then_verify_and_identify() {
        let mut b = vec![0u8; BLOCK_SIZE];
        b[100] = 7;
        for k in BlockKind::ALL {
            seal(&mut b, k);
            assert!(verify(&b, k));
            assert_eq!(identify(&b), Some(k));
            for other in BlockKind::ALL.into_iter().filter(|o| *o != k) {
                assert!(!verify(&b, other));
            }
        }
        b[200] ^= 1;
        assert_eq!(identify(&b), None);
    }
}
