//! persistent-data btrees: validated zero-copy node views, the one walker,
//! and the bulk builder.

mod build;
mod edit;
mod node;
mod walk;

pub use build::TreeBuilder;
pub use edit::*;
pub use node::*;
pub use walk::*;
