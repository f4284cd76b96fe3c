//! snap_merge (being written).

use std::ffi::OsString;

use super::*;

pub fn main(name: &'static str, _args: Vec<OsString>) -> i32 {
    eprintln!("{name}: not implemented yet");
    EXIT_INTERNAL
}
