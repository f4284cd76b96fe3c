//! thinmeta: offline tools for Linux device-mapper metadata.
//!
//! Layers, lowest first:
//! - [`pdata`]: the persistent-data library (block I/O, checksums, btrees, space maps).
//!   It knows nothing of thin provisioning.
//! - [`thin`]: dm-thin metadata on top of `pdata` (superblock, devices, dump, check).
//! - [`snapshot`]: dm-snapshot persistent COW stores (read, check, dump, merge).
//! - [`cli`]: one module per command: options in, library call, exit code out.

pub mod cli;
pub mod dm;
#[doc(hidden)]
pub mod fuzzing;
pub mod pdata;
pub mod snapshot;
pub mod thin;
