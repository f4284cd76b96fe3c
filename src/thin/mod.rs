//! dm-thin metadata: superblock, devices, mapping trees, and the tools' logic.

pub mod check;
pub mod def_name;
pub mod delta;
pub mod device;
pub mod dump;
pub mod extract;
pub mod generate;
pub mod ls;
pub mod merge;
pub mod message;
pub mod metadata;
pub mod metadata_size;
pub mod migrate;
pub mod repair;
pub mod restore;
pub mod rmap;
pub mod runs;
pub mod shrink;
pub mod superblock;
pub mod trim;
pub mod xml_read;

use crate::pdata;

/// Errors of the thin tools' library layer; the command edge turns them into
/// one-line messages and exit codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The metadata is damaged (or unreadable) where `context` says.
    #[error("{context}: {source}")]
    Metadata {
        context: String,
        #[source]
        source: pdata::Error,
    },
    #[error("no metadata snapshot is held (the superblock's metadata_snap is 0)")]
    NoMetadataSnap,
    /// The trees contradict each other.
    #[error("{0}")]
    Inconsistent(String),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    /// A worker thread could not be started (a process or memory limit).
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

impl Error {
    pub fn metadata(context: impl Into<String>, source: pdata::Error) -> Self {
        Error::Metadata {
            context: context.into(),
            source,
        }
    }
}
