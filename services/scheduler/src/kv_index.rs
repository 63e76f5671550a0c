//! The exact prefix index: which engine holds which KV block, as the
//! engines themselves report it (their KV cache events, relayed by
//! `tether-kv-events` on `<p>.kv.<engine>`).
//!
//! - **Entries.** Block hash → bitmask of the engines that hold it, the
//!   bitmask of those predicted to (provisional), the block's parent hash
//!   and when the provisional bits expire. Engines past the 64th are not
//!   indexed.
//! - **Events.** `Stored` sets an engine's bit (and confirms a prediction),
//!   `Removed` clears it, `Cleared` and `Reset` purge the engine. Each
//!   engine's relay stream carries an epoch and a sequence number: a new
//!   epoch or a gap purges the engine too, since blocks may have come and
//!   gone unseen.
//! - **Predict-on-route.** Events arrive after the fact, so a call's blocks
//!   are marked provisional on the engine it is placed on, for
//!   `provisional_ms` (default 2 s): long enough for the engine to prefill
//!   and report, short enough that a call that never ran stops attracting
//!   others.
//! - **Match.** A prompt's match on an engine is the leading run of its
//!   blocks the engine holds or is predicted to hold, as a share of the
//!   prompt; it replaces the approximate index's answer for the engines
//!   whose events flow (those that have reported in the current epoch).
//! - **Snapshots.** A replica starting (or purging an engine after a gap)
//!   asks the relay for what the engine holds (`<p>.kv-snapshot`, paged,
//!   all pages at one relay `seq`) and loads it unless it already applied
//!   batches past that `seq`; relayed batches up to it are then duplicates.
//! - **Memory.** Bounded by `max_blocks` entries (new blocks past it are
//!   not indexed, and counted): 40 bytes of entry and key plus hashbrown's
//!   control byte and slack, so 41–82 bytes per block — at 1 M blocks, with
//!   the table at 2^21 buckets, 86 MB. Pending predictions take 16 bytes
//!   each, bounded by `max_blocks` too.

use std::collections::{HashMap, VecDeque};
use tether_protocol::hash::BuildU64Hasher;
use tether_protocol::{KvEvent, KvEventBatch};

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    held: u64,
    provisional: u64,
    /// The block before this one in its chain (0: none or unknown).
    parent: u64,
    /// Provisional bits count until then (ms since the Unix epoch).
    provisional_until: u64,
}

/// What applying a batch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// In order.
    Ok,
    /// A new epoch or a gap: the engine was purged first.
    Resynced,
    /// The batch names an engine the index does not know.
    UnknownEngine,
    /// Already applied (a snapshot included it).
    Duplicate,
}

#[derive(Clone, Copy, Debug, Default)]
struct Stream {
    epoch: u64,
    seq: u64,
    /// Events flow: a batch of the current epoch arrived.
    active: bool,
}

pub struct KvIndex {
    blocks: HashMap<u64, Entry, BuildU64Hasher>,
    /// Predictions by expiry, oldest first.
    expiry: VecDeque<(u64, u64)>,
    streams: Vec<Stream>,
    max_blocks: usize,
    provisional_ms: u64,
    /// Blocks not indexed because the index was full.
    pub dropped: u64,
    /// Purges of an engine (resets, clears, gaps, new epochs).
    pub purges: u64,
}

impl KvIndex {
    pub fn new(engines: usize, max_blocks: usize, provisional_ms: u64) -> Self {
        Self {
            blocks: HashMap::default(),
            expiry: VecDeque::new(),
            streams: vec![Stream::default(); engines.min(64)],
            max_blocks,
            provisional_ms,
            dropped: 0,
            purges: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Engines the index follows (0 when it is off).
    pub fn engines(&self) -> usize {
        self.streams.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Whether `engine`'s events flow (it has reported in its current epoch).
    pub fn active(&self, engine: usize) -> bool {
        self.streams.get(engine).is_some_and(|s| s.active)
    }

    /// Blocks `engine` holds (confirmed).
    pub fn held_by(&self, engine: usize) -> usize {
        if engine >= 64 {
            return 0;
        }
        let bit = 1u64 << engine;
        self.blocks.values().filter(|e| e.held & bit != 0).count()
    }

    /// Whether `engine` holds `hash` (confirmed).
    pub fn holds(&self, engine: usize, hash: u64) -> bool {
        engine < 64
            && self
                .blocks
                .get(&hash)
                .is_some_and(|e| e.held & (1 << engine) != 0)
    }

    /// The parent of a block, when known.
    pub fn parent(&self, hash: u64) -> Option<u64> {
        self.blocks.get(&hash).map(|e| e.parent).filter(|p| *p != 0)
    }

    /// Applies one relayed batch of `engine`'s events.
    pub fn apply(&mut self, engine: usize, batch: &KvEventBatch) -> Applied {
        let Some(stream) = self.streams.get(engine).copied() else {
            return Applied::UnknownEngine;
        };
        let mut outcome = Applied::Ok;
        if stream.active && stream.epoch == batch.epoch && batch.seq <= stream.seq {
            return Applied::Duplicate;
        }
        if !stream.active || stream.epoch != batch.epoch || batch.seq != stream.seq + 1 {
            // The first batch of a stream is in order only at seq 1 of an
            // epoch never seen before; anything else lost something.
            if stream.active || batch.seq != 1 {
                outcome = Applied::Resynced;
            }
            self.purge(engine);
        }
        self.streams[engine] = Stream {
            epoch: batch.epoch,
            seq: batch.seq,
            active: true,
        };
        let bit = 1u64 << engine;
        for e in &batch.events {
            match e {
                KvEvent::Stored { hashes, parent, .. } => {
                    let mut parent = parent.unwrap_or(0);
                    for &h in hashes {
                        if let Some(entry) = self.blocks.get_mut(&h) {
                            entry.held |= bit;
                            entry.provisional &= !bit;
                            if parent != 0 {
                                entry.parent = parent;
                            }
                        } else if self.blocks.len() < self.max_blocks {
                            self.blocks.insert(
                                h,
                                Entry {
                                    held: bit,
                                    parent,
                                    ..Entry::default()
                                },
                            );
                        } else {
                            self.dropped += 1;
                        }
                        parent = h;
                    }
                }
                KvEvent::Removed { hashes } => {
                    for h in hashes {
                        if let Some(entry) = self.blocks.get_mut(h) {
                            entry.held &= !bit;
                            if entry.held == 0 && entry.provisional == 0 {
                                self.blocks.remove(h);
                            }
                        }
                    }
                }
                KvEvent::Cleared | KvEvent::Reset => self.purge(engine),
            }
        }
        outcome
    }

    /// Loads a snapshot of what `engine` holds, taken at relay `(epoch,
    /// seq)`, unless batches past it were applied already (then it would
    /// undo them: false, nothing changes).
    pub fn load_snapshot(
        &mut self,
        engine: usize,
        epoch: u64,
        seq: u64,
        blocks: &[(u64, u64)],
    ) -> bool {
        let Some(stream) = self.streams.get(engine).copied() else {
            return false;
        };
        if stream.active && (stream.epoch != epoch || stream.seq > seq) {
            return false;
        }
        self.purge(engine);
        let bit = 1u64 << engine;
        for &(h, parent) in blocks {
            if let Some(e) = self.blocks.get_mut(&h) {
                e.held |= bit;
            } else if self.blocks.len() < self.max_blocks {
                self.blocks.insert(
                    h,
                    Entry {
                        held: bit,
                        parent,
                        ..Entry::default()
                    },
                );
            } else {
                self.dropped += 1;
            }
        }
        self.streams[engine] = Stream {
            epoch,
            seq,
            active: true,
        };
        true
    }

    /// Forgets everything `engine` held or was predicted to hold.
    pub fn purge(&mut self, engine: usize) {
        if engine >= 64 {
            return;
        }
        self.purges += 1;
        let bit = 1u64 << engine;
        self.blocks.retain(|_, e| {
            e.held &= !bit;
            e.provisional &= !bit;
            e.held != 0 || e.provisional != 0
        });
    }

    /// Predict-on-route: `engine` is about to prefill `blocks`.
    pub fn predict(&mut self, blocks: &[u64], engine: usize, now_ms: u64) {
        if !self.active(engine) {
            return;
        }
        self.expire(now_ms);
        let bit = 1u64 << engine;
        let until = now_ms.saturating_add(self.provisional_ms);
        for (i, &h) in blocks.iter().enumerate() {
            let parent = if i > 0 { blocks[i - 1] } else { 0 };
            let room = self.blocks.len() < self.max_blocks;
            match self.blocks.get_mut(&h) {
                Some(e) if e.held & bit != 0 => continue,
                Some(e) => {
                    e.provisional |= bit;
                    e.provisional_until = until;
                }
                None if room => {
                    self.blocks.insert(
                        h,
                        Entry {
                            provisional: bit,
                            parent,
                            provisional_until: until,
                            ..Entry::default()
                        },
                    );
                }
                None => {
                    self.dropped += 1;
                    continue;
                }
            }
            if self.expiry.len() >= self.max_blocks {
                self.expiry.pop_front();
            }
            self.expiry.push_back((h, until));
        }
    }

    /// Drops predictions whose time is up.
    pub fn expire(&mut self, now_ms: u64) {
        while let Some(&(h, until)) = self.expiry.front() {
            if until > now_ms {
                break;
            }
            self.expiry.pop_front();
            if let Some(e) = self.blocks.get_mut(&h)
                && e.provisional_until <= now_ms
            {
                e.provisional = 0;
                if e.held == 0 {
                    self.blocks.remove(&h);
                }
            }
        }
    }

    /// For each engine whose events flow, overwrites `ratios[engine]` with
    /// the share of `blocks` it holds (or is predicted to hold) as a
    /// leading run. Other engines keep what the approximate index said.
    pub fn overlay(&self, blocks: &[u64], now_ms: u64, ratios: &mut [f64]) {
        let mut alive = 0u64;
        for (i, r) in ratios.iter_mut().enumerate().take(self.streams.len()) {
            if self.streams[i].active {
                alive |= 1 << i;
                *r = 0.0;
            }
        }
        if alive == 0 || blocks.is_empty() {
            return;
        }
        let n = blocks.len() as f64;
        for (depth, h) in blocks.iter().enumerate() {
            let mask = self.blocks.get(h).map_or(0, |e| {
                let prov = if e.provisional_until > now_ms {
                    e.provisional
                } else {
                    0
                };
                e.held | prov
            }) & alive;
            let mut gone = alive & !mask;
            while gone != 0 {
                let i = gone.trailing_zeros() as usize;
                ratios[i] = depth as f64 / n;
                gone &= gone - 1;
            }
            alive = mask;
            if alive == 0 {
                return;
            }
        }
        while alive != 0 {
            let i = alive.trailing_zeros() as usize;
            ratios[i] = 1.0;
            alive &= alive - 1;
        }
    }
}

/// Fetches a whole snapshot of what `engine` holds from the KV events
/// relay: `(epoch, seq, blocks)`. Pages of another `seq` than the first
/// mean the relay started over; the fetch fails then (the caller retries).
pub async fn fetch_snapshot(
    bus: &tether_bus::Bus,
    engine: &str,
    page: u32,
) -> Result<(u64, u64, Vec<(u64, u64)>), String> {
    let mut after = None;
    let mut blocks = Vec::new();
    let mut at: Option<(u64, u64)> = None;
    loop {
        let req = tether_protocol::KvSnapshotRequest {
            engine: engine.to_owned(),
            after,
            limit: page,
        };
        let p: tether_protocol::KvSnapshotPage = bus
            .request(
                bus.subjects.kv_snapshot(),
                &req,
                std::time::Duration::from_secs(2),
            )
            .await
            .map_err(|e| e.to_string())?;
        match at {
            None => at = Some((p.epoch, p.seq)),
            Some(a) if a != (p.epoch, p.seq) => return Err("the snapshot changed".into()),
            Some(_) => {}
        }
        blocks.extend(p.blocks);
        match p.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let (epoch, seq) = at.unwrap_or((0, 0));
    Ok((epoch, seq, blocks))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(epoch: u64, seq: u64, events: Vec<KvEvent>) -> KvEventBatch {
        KvEventBatch {
            engine: "e".into(),
            epoch,
            seq,
            engine_seq: seq,
            at_ms: 0,
            events,
        }
    }

    fn stored(hashes: &[u64]) -> KvEvent {
        KvEvent::Stored {
            hashes: hashes.to_vec(),
            parent: None,
            block_size: 16,
        }
    }

    fn ratios(ix: &KvIndex, blocks: &[u64], now: u64) -> Vec<f64> {
        let mut r = vec![0.5; 3];
        ix.overlay(blocks, now, &mut r);
        r
    }

    #[test]
    fn leading_runs_of_held_blocks_per_engine() {
        let mut ix = KvIndex::new(3, 100, 1000);
        assert_eq!(
            ix.apply(0, &batch(1, 1, vec![stored(&[1, 2, 3, 4])])),
            Applied::Ok
        );
        assert_eq!(
            ix.apply(1, &batch(7, 1, vec![stored(&[1, 2])])),
            Applied::Ok
        );
        assert_eq!(ix.parent(2), Some(1));
        // Engine 2 has no events: it keeps the approximate answer.
        assert_eq!(ratios(&ix, &[1, 2, 3, 4], 0), vec![1.0, 0.5, 0.5]);
        assert_eq!(ratios(&ix, &[1, 2, 9, 4], 0), vec![0.5, 0.5, 0.5]);
        ix.apply(0, &batch(1, 2, vec![KvEvent::Removed { hashes: vec![2] }]));
        assert_eq!(ratios(&ix, &[1, 2, 3, 4], 0), vec![0.25, 0.5, 0.5]);
    }

    #[test]
    fn clears_resets_gaps_and_new_epochs_purge_the_engine() {
        let mut ix = KvIndex::new(2, 100, 1000);
        ix.apply(0, &batch(1, 1, vec![stored(&[1, 2])]));
        ix.apply(1, &batch(5, 1, vec![stored(&[1, 2])]));
        ix.apply(0, &batch(1, 2, vec![KvEvent::Cleared, stored(&[3])]));
        assert!(!ix.holds(0, 1) && ix.holds(0, 3) && ix.holds(1, 1));
        assert_eq!(
            ix.apply(0, &batch(1, 4, vec![stored(&[8])])),
            Applied::Resynced
        );
        assert!(!ix.holds(0, 3) && ix.holds(0, 8));
        assert_eq!(ix.apply(0, &batch(2, 1, vec![])), Applied::Resynced);
        assert_eq!(ix.held_by(0), 0);
        ix.apply(1, &batch(5, 2, vec![KvEvent::Reset]));
        assert!(ix.is_empty());
        assert_eq!(ix.apply(7, &batch(1, 1, vec![])), Applied::UnknownEngine);
    }

    #[test]
    fn predictions_count_until_confirmed_or_expired() {
        let mut ix = KvIndex::new(2, 100, 1000);
        ix.predict(&[1, 2], 0, 0);
        assert!(ix.is_empty(), "no prediction for an engine without events");
        ix.apply(0, &batch(1, 1, vec![]));
        ix.predict(&[1, 2], 0, 0);
        assert_eq!(ratios(&ix, &[1, 2], 500)[0], 1.0);
        // Confirmed: stays after the prediction expires.
        ix.apply(0, &batch(1, 2, vec![stored(&[1])]));
        ix.expire(1000);
        assert_eq!(ratios(&ix, &[1, 2], 1000)[0], 0.5);
        assert!(ix.holds(0, 1) && ix.len() == 1);
    }

    #[test]
    fn a_snapshot_loads_unless_overtaken_and_its_batches_are_duplicates() {
        let mut ix = KvIndex::new(1, 100, 1000);
        assert!(ix.load_snapshot(0, 3, 10, &[(1, 0), (2, 1)]));
        assert!(ix.holds(0, 2) && ix.parent(2) == Some(1));
        assert_eq!(
            ix.apply(0, &batch(3, 9, vec![KvEvent::Cleared])),
            Applied::Duplicate
        );
        assert_eq!(ix.apply(0, &batch(3, 11, vec![stored(&[5])])), Applied::Ok);
        assert!(
            !ix.load_snapshot(0, 3, 10, &[]),
            "older than what was applied"
        );
        assert!(ix.holds(0, 5));
    }

    #[test]
    fn memory_is_bounded() {
        let mut ix = KvIndex::new(1, 3, 1000);
        ix.apply(0, &batch(1, 1, vec![stored(&[1, 2, 3, 4, 5])]));
        assert_eq!(ix.len(), 3);
        assert_eq!(ix.dropped, 2);
    }
}
