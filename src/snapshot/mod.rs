//! dm-snapshot persistent exception stores (COW devices): reading, checking,
//! dumping, and the crash-safe offline merge into the origin.

pub mod cow;
pub mod merge;
