//! Typed errors of the persistent-data layer. Every variant that concerns a
//! block names it; the command edge adds the device path.

use std::fmt;

use super::checksum::BlockKind;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What is wrong with the contents of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The checksum does not match the expected block kind.
    BadChecksum {
        expected: BlockKind,
        found: Option<BlockKind>,
    },
    /// The block's self-reference (`blocknr` at offset 8) is not its location.
    WrongLocation { found: u64 },
    /// A header field is out of range; the string names field and value.
    BadHeader(String),
    /// Anything else structurally wrong inside the block.
    Invalid(String),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // "bad checksum in superblock" is the peer's phrase, which
            // scripts look for.
            Problem::BadChecksum {
                expected: BlockKind::ThinSuperblock,
                found: None,
            } => f.write_str("bad checksum in superblock (the block is no known metadata block)"),
            Problem::BadChecksum {
                expected: BlockKind::ThinSuperblock,
                found: Some(k),
            } => write!(
                f,
                "bad checksum in superblock (expected a thin superblock but found a {k})"
            ),
            Problem::BadChecksum {
                expected,
                found: None,
            } => {
                write!(
                    f,
                    "bad checksum (expected a {expected}; the block is no known metadata block)"
                )
            }
            Problem::BadChecksum {
                expected,
                found: Some(k),
            } => {
                write!(f, "expected a {expected} but found a {k}")
            }
            Problem::WrongLocation { found } => {
                write!(
                    f,
                    "block claims to be block {found} (misplaced or stale copy)"
                )
            }
            Problem::BadHeader(s) | Problem::Invalid(s) => f.write_str(s),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error reading block {block}: {source}")]
    Io {
        block: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error writing block {block}: {source}")]
    WriteIo {
        block: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error flushing the written blocks to the device: {0}")]
    Flush(#[source] std::io::Error),
    #[error("block {block} is beyond the end of the device ({nr_blocks} blocks)")]
    OutOfBounds { block: u64, nr_blocks: u64 },
    #[error("block {block}: {problem}")]
    Corrupt { block: u64, problem: Problem },
    #[error("{0}")]
    Other(String),
}

impl Clone for Error {
    /// `std::io::Error` is not `Clone`; a copy keeps its kind and message.
    fn clone(&self) -> Self {
        match self {
            Error::Io { block, source } => Error::Io {
                block: *block,
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::WriteIo { block, source } => Error::WriteIo {
                block: *block,
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            Error::Flush(source) => {
                Error::Flush(std::io::Error::new(source.kind(), source.to_string()))
            }
            Error::OutOfBounds { block, nr_blocks } => Error::OutOfBounds {
                block: *block,
                nr_blocks: *nr_blocks,
            },
            Error::Corrupt { block, problem } => Error::Corrupt {
                block: *block,
                problem: problem.clone(),
            },
            Error::Other(s) => Error::Other(s.clone()),
        }
    }
}

impl Error {
    pub fn corrupt(block: u64, problem: Problem) -> Self {
        Error::Corrupt { block, problem }
    }
    pub fn invalid(block: u64, msg: impl Into<String>) -> Self {
        Error::Corrupt {
            block,
            problem: Problem::Invalid(msg.into()),
        }
    }
    /// Block the error is about, if any.
    pub fn block(&self) -> Option<u64> {
        match self {
            Error::Io { block, .. }
            | Error::WriteIo { block, .. }
            | Error::OutOfBounds { block, .. }
            | Error::Corrupt { block, .. } => Some(*block),
            Error::Other(_) | Error::Flush(_) => None,
        }
    }
    /// True for errors of the medium rather than of the metadata.
    pub fn is_io(&self) -> bool {
        matches!(
            self,
            Error::Io { .. } | Error::WriteIo { .. } | Error::Flush(_)
        )
    }
}
