//! The thin pool's devices, read through the one walker: the device details
//! tree joined with the top level of the mapping tree.

use std::collections::BTreeMap;

use crate::pdata::btree::{Issue, Walker};
use crate::pdata::error::Error;
use crate::thin::device::DeviceDetails;
use crate::thin::superblock::Superblock;

/// One thin device: its id, details, and the root of its mapping tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThinDevice {
    pub id: u64,
    pub details: DeviceDetails,
    pub root: u64,
}

/// What reading the device lists found.
pub struct Devices {
    pub details: BTreeMap<u64, DeviceDetails>,
    /// Device id -> bottom-level mapping root; None if the top level was not read.
    pub roots: Option<BTreeMap<u64, u64>>,
    /// Problems, each with the tree it was found in.
    pub issues: Vec<(&'static str, Issue)>,
}

impl Devices {
    /// Read the details tree and (unless `details_only`) the top level of the
    /// mapping tree of `sb`. Each distinct top-level leaf counts a reference
    /// to every bottom-level root it holds, as the kernel's ref counting does.
    pub fn read(walker: &mut Walker, sb: &Superblock, details_only: bool) -> Devices {
        let mut issues = Vec::new();
        walker.inc_ref(sb.details_root);
        let d = walker.read_map::<DeviceDetails>(sb.details_root, |_| {});
        issues.extend(d.issues.into_iter().map(|i| ("device details tree", i)));
        let details: BTreeMap<u64, DeviceDetails> = d.entries.into_iter().collect();

        let roots = if details_only {
            None
        } else {
            walker.inc_ref(sb.mapping_root);
            let mut bottom_roots = Vec::new();
            let m = walker.read_map::<u64>(sb.mapping_root, |leaf| {
                bottom_roots.extend(leaf.entries::<u64>().map(|(_, r)| r));
            });
            for r in bottom_roots {
                walker.inc_ref(r);
            }
            issues.extend(
                m.issues
                    .into_iter()
                    .map(|i| ("mapping tree (top level)", i)),
            );
            Some(m.entries.into_iter().collect())
        };
        Devices {
            details,
            roots,
            issues,
        }
    }

    /// Devices present in both trees, by id. Ids found in only one tree are errors.
    pub fn joined(&self) -> (Vec<ThinDevice>, Vec<String>) {
        let mut devs = Vec::new();
        let mut errs = Vec::new();
        let Some(roots) = &self.roots else {
            return (devs, errs);
        };
        for (&id, &details) in &self.details {
            match roots.get(&id) {
                Some(&root) => devs.push(ThinDevice { id, details, root }),
                None => errs.push(format!(
                    "device {id} is in the device details tree but has no mapping tree"
                )),
            }
        }
        for id in roots.keys().filter(|id| !self.details.contains_key(id)) {
            errs.push(format!(
                "device {id} has a mapping tree but no entry in the device details tree"
            ));
        }
        (devs, errs)
    }

    pub fn first_fatal(&self) -> Option<(&'static str, &Error)> {
        self.issues
            .iter()
            .find(|(_, i)| i.fatal)
            .map(|(t, i)| (*t, &i.error))
    }
}
