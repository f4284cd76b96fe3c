//! persistent-data btrees: validated zero-copy node views and the one walker.

mod node;
mod walk;

pub use node::*;
pub use walk::*;
