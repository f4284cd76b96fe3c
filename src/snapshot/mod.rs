//! dm-snapshot persistent exception stores (COW devices): reading, checking,
//! dumping, and the crash-safe offline merge into the origin.
//!
//! - [`dev`]: byte-addressed devices (the [`dev::Store`] trait, exclusive opens).
//! - [`cow`]: the on-disk format: header, layout, metadata areas as zero-copy
//!   views, the end-of-table rule, [`cow::CowStore`] and its scan.
//! - [`check`]: the consistency rules (duplicates, order, ranges, overlaps).
//! - [`dump`]: human, XML and JSON listings of a store.
//! - [`merge`]: `snapshot-merge` offline, with the kernel's order and commits.

pub mod check;
pub mod cow;
pub mod dev;
pub mod dump;
pub mod merge;

use std::fmt;

/// What is wrong with a header chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderProblem {
    /// Magic 0: a new COW device the kernel has not formatted yet.
    Unformatted,
    BadMagic(u32),
    BadVersion(u32),
    /// Zero or not a power of two (sectors).
    BadChunkSize(u32),
    /// Larger than the kernel accepts (`INT_MAX >> 9` sectors).
    ChunkSizeTooLarge(u32),
}

impl fmt::Display for HeaderProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeaderProblem::Unformatted => f.write_str(
                "no snapshot header (magic is 0: an unused COW device, which the kernel would format)",
            ),
            HeaderProblem::BadMagic(m) => write!(
                f,
                "bad magic 0x{m:08x} in the header (a persistent snapshot store has 0x{:08x}, \"SnAp\")",
                cow::SNAP_MAGIC
            ),
            HeaderProblem::BadVersion(v) => write!(
                f,
                "unsupported store version {v} in the header (only version {} exists)",
                cow::DISK_VERSION
            ),
            HeaderProblem::BadChunkSize(c) => write!(
                f,
                "chunk size {c} sectors in the header is not a power of two"
            ),
            HeaderProblem::ChunkSizeTooLarge(c) => write!(
                f,
                "chunk size {c} sectors in the header is larger than the kernel allows ({} sectors)",
                cow::MAX_CHUNK_SECTORS
            ),
        }
    }
}

/// Errors of the snapshot library. Each names the device (its path as
/// given), and where relevant the metadata area, record and chunk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{device}: {problem}")]
    Header {
        device: String,
        problem: HeaderProblem,
    },
    #[error("{device}: too small for a snapshot store: {size} bytes, but the header and the first metadata area need {need} bytes (2 chunks)")]
    TooSmall {
        device: String,
        size: u64,
        need: u64,
    },
    #[error("{device}: metadata area {area} (chunk {chunk}) lies past the end of the device ({nr_chunks} whole chunks): the store is truncated")]
    AreaTruncated {
        device: String,
        area: u64,
        chunk: u64,
        nr_chunks: u64,
    },
    #[error("{device}: the store is marked invalid (the snapshot overflowed or failed; valid = 0 in the header): the kernel refuses to use or merge it")]
    Invalid { device: String },
    /// The exception table breaks a rule of the format (see [`check`]).
    #[error("{device}: the exception table is corrupt ({count} problem(s)); first: {first}")]
    Corrupt {
        device: String,
        count: u64,
        first: check::Finding,
    },
    #[error("{device}: the origin is too small: {size} bytes, but area {area} record {record} maps origin chunk {old}, which starts at byte {needs}")]
    OriginTooSmall {
        device: String,
        size: u64,
        needs: u64,
        area: u64,
        record: u64,
        old: u64,
    },
    #[error("{device}: {what}: {source}")]
    Io {
        device: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("writing output: {0}")]
    Output(std::io::Error),
}

impl Error {
    pub fn io(device: &str, what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            device: device.to_string(),
            what: what.into(),
            source,
        }
    }

    /// An I/O failure (as opposed to bad contents).
    pub fn is_io(&self) -> bool {
        matches!(self, Error::Io { .. } | Error::Output(_))
    }
}
