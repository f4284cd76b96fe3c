//! Finding leaf runs shared between devices, for `<def>`/`<ref>` in dumps.
//!
//! Each device's mapping tree is a sequence of leaf blocks. The sequences
//! are cut into atomic runs: a run starts where some sequence starts, where
//! a leaf is reached from different predecessors, or after a leaf with other
//! than one successor; it extends while each leaf has exactly one successor
//! that starts no run. A run reached more than once (from several sequences,
//! or repeated) is *shared*: the dump prints it once as `<def name=FIRST_LEAF>`
//! and devices `<ref>` it. This reproduces the peer's output exactly.

use std::collections::HashMap;

use fixedbitset::FixedBitSet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Run {
    pub leaves: Vec<u64>,
    pub shared: bool,
}

pub struct RunGatherer {
    /// Successors of each leaf, sorted.
    succ: HashMap<u64, Vec<u64>>,
    /// First predecessor each leaf was seen with.
    pred: HashMap<u64, u64>,
    head: FixedBitSet,
    tail: FixedBitSet,
    shared: FixedBitSet,
    prev: Option<u64>,
}

impl RunGatherer {
    /// `nr_blocks` bounds the leaf block numbers (the metadata device size).
    pub fn new(nr_blocks: u64) -> RunGatherer {
        let n = nr_blocks as usize;
        RunGatherer {
            succ: HashMap::new(),
            pred: HashMap::new(),
            head: FixedBitSet::with_capacity(n),
            tail: FixedBitSet::with_capacity(n),
            shared: FixedBitSet::with_capacity(n),
            prev: None,
        }
    }

    fn mark_head(&mut self, b: u64) {
        if self.head.put(b as usize) {
            self.shared.insert(b as usize);
        }
    }

    /// Start a new sequence (ends the previous one).
    pub fn begin_sequence(&mut self) {
        if let Some(p) = self.prev.take() {
            self.tail.insert(p as usize);
        }
    }

    pub fn push(&mut self, b: u64) {
        match self.prev {
            Some(p) => {
                let s = self.succ.get_mut(&p).expect("predecessor recorded");
                match s.binary_search(&b) {
                    Ok(_) => self.shared.insert(b as usize),
                    Err(i) => s.insert(i, b),
                }
                match self.pred.get(&b) {
                    Some(&q) if q != p => self.mark_head(b),
                    Some(_) => {}
                    None => {
                        self.pred.insert(b, p);
                    }
                }
            }
            None => self.mark_head(b),
        }
        self.succ.entry(b).or_default();
        self.prev = Some(b);
    }

    /// Cut the sequences into runs, in ascending order of their first leaf.
    pub fn finish(mut self) -> Vec<Run> {
        self.begin_sequence();
        let extra: Vec<u64> = self
            .succ
            .iter()
            .filter(|(_, s)| s.len() != 1 || self.head.contains(s[0] as usize))
            .map(|(&b, _)| b)
            .collect();
        for b in extra {
            self.tail.insert(b as usize);
        }
        let tails: Vec<usize> = self.tail.ones().collect();
        for t in tails {
            if let Some(s) = self.succ.get(&(t as u64)).cloned() {
                for n in s {
                    self.mark_head(n);
                }
            }
        }
        let limit = self.succ.len();
        let mut runs = Vec::new();
        for h in self.head.ones() {
            let mut leaves = Vec::new();
            let mut b = h as u64;
            loop {
                leaves.push(b);
                if self.tail.contains(b as usize) || leaves.len() > limit {
                    break;
                }
                match self.succ.get(&b).and_then(|s| s.first()) {
                    Some(&n) => b = n,
                    None => break,
                }
            }
            runs.push(Run {
                leaves,
                shared: self.shared.contains(h),
            });
        }
        runs
    }
}

/// One item of a device's (or def's) content in a dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    Leaf(u64),
    /// A shared run, named by its first leaf.
    Ref(u64),
}

/// Runs of `sequences`, and each sequence rewritten as leaves and refs to shared runs.
pub struct SharingPlan {
    pub defs: Vec<Run>,
    pub sequences: Vec<Vec<Entry>>,
}

pub fn plan_sharing(nr_blocks: u64, sequences: &[&[u64]]) -> SharingPlan {
    let mut g = RunGatherer::new(nr_blocks);
    for s in sequences {
        g.begin_sequence();
        for &b in *s {
            g.push(b);
        }
    }
    let runs = g.finish();
    let by_head: HashMap<u64, usize> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| (r.leaves[0], i))
        .collect();
    let mut out = Vec::with_capacity(sequences.len());
    for s in sequences {
        let mut es = Vec::new();
        let mut i = 0;
        while i < s.len() {
            let b = s[i];
            match by_head.get(&b).map(|&r| &runs[r]) {
                Some(run) if s[i..].starts_with(&run.leaves) => {
                    if run.shared {
                        es.push(Entry::Ref(b));
                    } else {
                        es.extend(run.leaves.iter().map(|&l| Entry::Leaf(l)));
                    }
                    i += run.leaves.len();
                }
                _ => {
                    es.push(Entry::Leaf(b));
                    i += 1;
                }
            }
        }
        out.push(es);
    }
    let defs = runs.into_iter().filter(|r| r.shared).collect();
    SharingPlan {
        defs,
        sequences: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gather(seqs: &[&[u64]]) -> Vec<(Vec<u64>, bool)> {
        let mut g = RunGatherer::new(100);
        for s in seqs {
            g.begin_sequence();
            for &b in *s {
                g.push(b);
            }
        }
        g.finish()
            .into_iter()
            .map(|r| (r.leaves, r.shared))
            .collect()
    }

    #[test]
    fn runs_split_where_sequences_diverge() {
        assert_eq!(gather(&[]), vec![]);
        assert_eq!(gather(&[&[1]]), vec![(vec![1], false)]);
        assert_eq!(gather(&[&[1, 2, 3]]), vec![(vec![1, 2, 3], false)]);
        assert_eq!(
            gather(&[&[1, 2], &[1, 2, 3]]),
            vec![(vec![1, 2], true), (vec![3], false)]
        );
        assert_eq!(
            gather(&[&[2, 3], &[1, 2, 3]]),
            vec![(vec![1], false), (vec![2, 3], true)]
        );
        assert_eq!(
            gather(&[&[1, 2, 3, 4], &[2, 3, 4, 5]]),
            vec![(vec![1], false), (vec![2, 3, 4], true), (vec![5], false)]
        );
        assert_eq!(
            gather(&[&[1, 2, 3, 4], &[2, 3, 4, 5, 6], &[3, 4], &[5, 6]]),
            vec![
                (vec![1], false),
                (vec![2], true),
                (vec![3, 4], true),
                (vec![5, 6], true)
            ]
        );
        assert_eq!(
            gather(&[&[2, 3, 4, 5], &[2, 3, 4, 6], &[1, 3, 4, 5]]),
            vec![
                (vec![1], false),
                (vec![2], true),
                (vec![3, 4], true),
                (vec![5], true),
                (vec![6], false)
            ]
        );
        assert_eq!(
            gather(&[&[1, 2], &[2, 1]]),
            vec![(vec![1], true), (vec![2], true)]
        );
    }

    #[test]
    fn plan_replaces_shared_runs_with_refs() {
        let a: &[u64] = &[10, 11, 12, 20];
        let b: &[u64] = &[10, 11, 12, 30];
        let p = plan_sharing(100, &[a, b]);
        assert_eq!(
            p.defs,
            vec![Run {
                leaves: vec![10, 11, 12],
                shared: true
            }]
        );
        assert_eq!(p.sequences[0], vec![Entry::Ref(10), Entry::Leaf(20)]);
        assert_eq!(p.sequences[1], vec![Entry::Ref(10), Entry::Leaf(30)]);
    }

    #[test]
    fn a_cycle_terminates() {
        // Corrupt input can make leaf sequences loop; gathering must end.
        let p = plan_sharing(100, &[&[1, 2, 1, 2, 1]]);
        assert!(p.sequences[0].len() <= 5);
    }
}
