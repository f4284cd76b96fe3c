//! The persistent-data library: the on-disk structures the kernel's
//! `drivers/md/persistent-data` writes, independent of any target.

pub mod btree;
pub mod checksum;
pub mod counts;
pub mod crc;
pub mod error;
pub mod io;
pub mod mem;
pub mod pack;
pub mod scan;
pub mod space_map;
pub mod txn;
pub mod writer;

pub use error::{Error, Result};

/// Metadata block size in bytes (8 sectors); fixed by the kernel.
pub const BLOCK_SIZE: usize = 4096;

/// Read a little-endian u32 at `off`. Callers guarantee bounds (views are validated once).
#[inline(always)]
pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

/// Read a little-endian u64 at `off`. Callers guarantee bounds (views are validated once).
#[inline(always)]
pub fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
}
