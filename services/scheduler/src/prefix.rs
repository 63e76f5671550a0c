//! An approximate index of which engines recently received which prompt
//! blocks (as the Gateway API Inference Extension's prefix-cache scorer
//! keeps): block hash → bitmask of engines, bounded by LRU over blocks.
//!
//! It is approximate in two ways, both documented in `docs/policy.md`: it
//! knows what the scheduler *placed*, not what the engine kept; and one LRU
//! clock serves all engines, so a block leaves for every engine at once.
//! Engines past the 64th are not indexed.

use std::collections::{HashMap, VecDeque};
use tether_protocol::hash::BuildU64Hasher;

pub struct PrefixIndex {
    blocks: HashMap<u64, (u64, u64), BuildU64Hasher>,
    order: VecDeque<(u64, u64)>,
    capacity: usize,
    clock: u64,
}

impl PrefixIndex {
    pub fn new(capacity: usize) -> Self {
        Self {
            blocks: HashMap::default(),
            order: VecDeque::new(),
            capacity,
            clock: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Notes that `engine` received a prompt made of `blocks`.
    pub fn insert(&mut self, blocks: &[u64], engine: usize) {
        if engine >= 64 || self.capacity == 0 {
            return;
        }
        for &b in blocks {
            self.clock += 1;
            let e = self.blocks.entry(b).or_insert((0, 0));
            e.0 |= 1 << engine;
            e.1 = self.clock;
            self.order.push_back((b, self.clock));
        }
        while self.blocks.len() > self.capacity || self.order.len() > 2 * self.capacity.max(1) {
            let Some((b, stamp)) = self.order.pop_front() else {
                break;
            };
            if self.blocks.get(&b).is_some_and(|(_, s)| *s == stamp) {
                self.blocks.remove(&b);
            }
        }
    }

    /// For each engine, the share of `blocks` it holds as a prefix (the
    /// leading run of blocks found), written into `out` (len = `engines`).
    pub fn match_ratios(&self, blocks: &[u64], engines: usize, out: &mut Vec<f64>) {
        out.clear();
        out.resize(engines, 0.0);
        if blocks.is_empty() {
            return;
        }
        let mut alive: u64 = if engines >= 64 {
            u64::MAX
        } else {
            (1u64 << engines) - 1
        };
        let mut depth = 0usize;
        for &b in blocks {
            let mask = self.blocks.get(&b).map_or(0, |(m, _)| *m) & alive;
            let dropped = alive & !mask;
            Self::credit(out, dropped, depth, blocks.len());
            alive = mask;
            if alive == 0 {
                return;
            }
            depth += 1;
        }
        Self::credit(out, alive, depth, blocks.len());
    }

    fn credit(out: &mut [f64], mut engines: u64, depth: usize, total: usize) {
        while engines != 0 {
            let i = engines.trailing_zeros() as usize;
            engines &= engines - 1;
            if let Some(o) = out.get_mut(i) {
                *o = depth as f64 / total as f64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_leading_runs_per_engine() {
        let mut ix = PrefixIndex::new(100);
        ix.insert(&[1, 2, 3, 4], 0);
        ix.insert(&[1, 2], 2);
        let mut out = Vec::new();
        ix.match_ratios(&[1, 2, 3, 9], 3, &mut out);
        assert_eq!(out, vec![0.75, 0.0, 0.5]);
        ix.match_ratios(&[7], 3, &mut out);
        assert_eq!(out, vec![0.0; 3]);
    }

    #[test]
    fn it_is_bounded_lru() {
        let mut ix = PrefixIndex::new(3);
        ix.insert(&[1, 2, 3], 0);
        ix.insert(&[1], 0); // refresh 1
        ix.insert(&[4], 1); // evicts 2, the least recent
        let mut out = Vec::new();
        ix.match_ratios(&[1, 2], 2, &mut out);
        assert_eq!(out, vec![0.5, 0.0]);
        assert!(ix.len() <= 3);
    }
}
