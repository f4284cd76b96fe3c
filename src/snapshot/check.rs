//! The consistency rules of an exception table.
//!
//! What the kernel guarantees when it writes a store, and so what a sound
//! table satisfies:
//! - every `new_chunk` is a data chunk of the device: below its last whole
//!   chunk, and not the header or a metadata area;
//! - no two exceptions share an `old_chunk` (one copy per origin chunk) or a
//!   `new_chunk` (one use per COW chunk);
//! - `new_chunk` increases along the table: the kernel allocates COW chunks
//!   in increasing order and commits exceptions in allocation order. A table
//!   where a `new_chunk` is lower than the one before it is "out of order"
//!   (older kernels that completed exceptions out of order could write it;
//!   it is still mergeable, but no current kernel produces it);
//! - with the origin known, every `old_chunk` starts before the origin's end
//!   (the origin's last chunk may be partial: it is clipped);
//! - the header says valid, and the table ends on the device.

use std::collections::HashSet;
use std::fmt;

use super::cow::{CowStore, Exception, Layout, Table};
use super::dev::Store;
use super::Error;

/// Where a record is: metadata area and index within it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub area: u64,
    pub record: u64,
}

impl fmt::Display for Loc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "area {} record {}", self.area, self.record)
    }
}

/// The kinds of problem, in the order they are reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Invalid,
    Truncated,
    PastCowEnd,
    OverlapsMetadata,
    PastOriginEnd,
    DuplicateOld,
    DuplicateNew,
    OutOfOrder,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Invalid,
        Kind::Truncated,
        Kind::PastCowEnd,
        Kind::OverlapsMetadata,
        Kind::PastOriginEnd,
        Kind::DuplicateOld,
        Kind::DuplicateNew,
        Kind::OutOfOrder,
    ];

    /// A short name for summaries.
    pub fn describe(&self) -> &'static str {
        match self {
            Kind::Invalid => "store marked invalid",
            Kind::Truncated => "table past the end of the device",
            Kind::PastCowEnd => "COW chunks past the end of the device",
            Kind::OverlapsMetadata => "COW chunks on metadata areas",
            Kind::PastOriginEnd => "origin chunks past the end of the origin",
            Kind::DuplicateOld => "duplicate origin chunks",
            Kind::DuplicateNew => "duplicate COW chunks",
            Kind::OutOfOrder => "COW chunks out of order",
        }
    }
}

/// One problem found in a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    Invalid,
    Truncated {
        area: u64,
        chunk: u64,
        nr_chunks: u64,
    },
    PastCowEnd {
        at: Loc,
        e: Exception,
        nr_chunks: u64,
    },
    OverlapsMetadata {
        at: Loc,
        e: Exception,
        area: u64,
    },
    PastOriginEnd {
        at: Loc,
        e: Exception,
        origin_bytes: u64,
        origin_chunks: u64,
    },
    DuplicateOld {
        old: u64,
        first: Loc,
        again: Loc,
    },
    DuplicateNew {
        new: u64,
        first: Loc,
        again: Loc,
    },
    OutOfOrder {
        at: Loc,
        e: Exception,
        prev: Exception,
    },
}

impl Finding {
    pub fn kind(&self) -> Kind {
        match self {
            Finding::Invalid => Kind::Invalid,
            Finding::Truncated { .. } => Kind::Truncated,
            Finding::PastCowEnd { .. } => Kind::PastCowEnd,
            Finding::OverlapsMetadata { .. } => Kind::OverlapsMetadata,
            Finding::PastOriginEnd { .. } => Kind::PastOriginEnd,
            Finding::DuplicateOld { .. } => Kind::DuplicateOld,
            Finding::DuplicateNew { .. } => Kind::DuplicateNew,
            Finding::OutOfOrder { .. } => Kind::OutOfOrder,
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::Invalid => f.write_str(
                "the store is marked invalid (valid = 0 in the header: the snapshot overflowed or failed)",
            ),
            Finding::Truncated {
                area,
                chunk,
                nr_chunks,
            } => write!(
                f,
                "area {} is full, but the next metadata area {area} (chunk {chunk}) lies past the end of the device ({nr_chunks} whole chunks)",
                area - 1
            ),
            Finding::PastCowEnd { at, e, nr_chunks } => write!(
                f,
                "{at}: old {} -> new {}: COW chunk past the end of the device ({nr_chunks} whole chunks)",
                e.old, e.new
            ),
            Finding::OverlapsMetadata { at, e, area } => write!(
                f,
                "{at}: old {} -> new {}: COW chunk {} is metadata area {area}, not a data chunk",
                e.old, e.new, e.new
            ),
            Finding::PastOriginEnd {
                at,
                e,
                origin_bytes,
                origin_chunks,
            } => write!(
                f,
                "{at}: old {} -> new {}: origin chunk past the end of the origin ({origin_bytes} bytes, {origin_chunks} chunks)",
                e.old, e.new
            ),
            Finding::DuplicateOld { old, first, again } => write!(
                f,
                "{again}: origin chunk {old} already has an exception at {first}"
            ),
            Finding::DuplicateNew { new, first, again } => write!(
                f,
                "{again}: COW chunk {new} is already used by the exception at {first}"
            ),
            Finding::OutOfOrder { at, e, prev } => write!(
                f,
                "{at}: old {} -> new {}: COW chunk lower than the previous record's ({}; the kernel allocates COW chunks in increasing order)",
                e.old, e.new, prev.new
            ),
        }
    }
}

/// Findings kept per kind (all are counted).
pub const KEEP_PER_KIND: usize = 100;

/// The result of checking a store.
#[derive(Debug, Clone)]
pub struct Report {
    pub table: Table,
    pub layout: Layout,
    /// Up to [`KEEP_PER_KIND`] findings of each kind, kinds in [`Kind::ALL`]
    /// order, each kind in table order.
    pub findings: Vec<Finding>,
    /// How many findings of each kind there are, [`Kind::ALL`] order.
    pub counts: [u64; 8],
    /// An exception for the origin's last, partial chunk: merged clipped.
    pub clipped: Option<(Loc, Exception)>,
}

impl Report {
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn count(&self, kind: Kind) -> u64 {
        self.counts[Kind::ALL.iter().position(|k| *k == kind).unwrap()]
    }

    pub fn is_sound(&self) -> bool {
        self.total() == 0
    }

    /// The first finding of `kind`, if any was kept.
    pub fn first(&self, kind: Kind) -> Option<&Finding> {
        self.findings.iter().find(|f| f.kind() == kind)
    }
}

struct Collector {
    kept: Vec<Vec<Finding>>,
    counts: [u64; 8],
}

impl Collector {
    fn add(&mut self, f: Finding) {
        let i = Kind::ALL.iter().position(|k| *k == f.kind()).unwrap();
        self.counts[i] += 1;
        if self.kept[i].len() < KEEP_PER_KIND {
            self.kept[i].push(f);
        }
    }
}

/// Check the store. `origin_bytes`: the origin's size, when known. Errors
/// are reserved for what stops the check itself (header, I/O); problems in
/// the table are findings.
pub fn check<S: Store + ?Sized>(
    store: &CowStore<'_, S>,
    origin_bytes: Option<u64>,
) -> Result<Report, Error> {
    let layout = *store.layout();
    let epa = layout.epa;
    let mut c = Collector {
        kept: vec![Vec::new(); Kind::ALL.len()],
        counts: [0; 8],
    };
    if !store.header().is_valid() {
        c.add(Finding::Invalid);
    }
    // The exceptions in table order, for the duplicate searches; a position
    // gives the location back because every area but the last is full.
    let mut all: Vec<Exception> = Vec::new();
    let mut inversions: Vec<(u64, Exception, Exception)> = Vec::new();
    let mut prev: Option<Exception> = None;
    let mut clipped = None;
    let origin_chunks = origin_bytes.map(|b| b.div_ceil(layout.chunk_bytes));
    let table = store.scan(|info, area| {
        for (i, e) in area.exceptions().enumerate() {
            let seq = info.index * epa + i as u64;
            let at = Loc {
                area: info.index,
                record: i as u64,
            };
            // A record whose COW chunk is not a data chunk at all is
            // reported as such, and left out of the order rule.
            let mut placed = true;
            if e.new >= layout.nr_chunks {
                c.add(Finding::PastCowEnd {
                    at,
                    e,
                    nr_chunks: layout.nr_chunks,
                });
                placed = false;
            } else if let Some(a) = layout.area_at(e.new) {
                c.add(Finding::OverlapsMetadata { at, e, area: a });
                placed = false;
            }
            if let Some(ob) = origin_bytes {
                match layout.chunk_offset(e.old) {
                    Some(start) if start < ob => {
                        if start + layout.chunk_bytes > ob && clipped.is_none() {
                            clipped = Some((at, e));
                        }
                    }
                    _ => c.add(Finding::PastOriginEnd {
                        at,
                        e,
                        origin_bytes: ob,
                        origin_chunks: origin_chunks.unwrap_or(0),
                    }),
                }
            }
            if placed {
                if let Some(p) = prev {
                    if e.new < p.new {
                        inversions.push((seq, e, p));
                    }
                }
                prev = Some(e);
            }
            all.push(e);
        }
        Ok(())
    })?;
    if let Some(area) = table.truncated_at {
        c.add(Finding::Truncated {
            area,
            chunk: layout.area_chunk(area),
            nr_chunks: layout.nr_chunks,
        });
    }
    let loc = |seq: u64| Loc {
        area: seq / epa,
        record: seq % epa,
    };
    // Records that repeat an earlier one: reported as duplicates only.
    let mut repeats: HashSet<u64> = HashSet::new();
    let mut order: Vec<u64> = (0..all.len() as u64).collect();
    for is_old in [true, false] {
        let key = |s: u64| {
            let e = all[s as usize];
            if is_old {
                e.old
            } else {
                e.new
            }
        };
        order.sort_unstable_by_key(|&s| (key(s), s));
        let mut i = 0;
        while i < order.len() {
            let k = key(order[i]);
            let mut j = i + 1;
            while j < order.len() && key(order[j]) == k {
                let (first, again) = (loc(order[i]), loc(order[j]));
                c.add(if is_old {
                    Finding::DuplicateOld {
                        old: k,
                        first,
                        again,
                    }
                } else {
                    repeats.insert(order[j]);
                    Finding::DuplicateNew {
                        new: k,
                        first,
                        again,
                    }
                });
                j += 1;
            }
            i = j;
        }
    }
    drop(order);
    drop(all);
    for (seq, e, p) in inversions {
        if !repeats.contains(&seq) {
            c.add(Finding::OutOfOrder {
                at: loc(seq),
                e,
                prev: p,
            });
        }
    }
    // Duplicates were found in chunk order; report them in table order.
    for kept in &mut c.kept {
        kept.sort_by_key(|f| match f {
            Finding::DuplicateOld { again, .. } | Finding::DuplicateNew { again, .. } => {
                (again.area, again.record)
            }
            _ => (0, 0),
        });
    }
    Ok(Report {
        table,
        layout,
        findings: c.kept.into_iter().flatten().collect(),
        counts: c.counts,
        clipped,
    })
}
