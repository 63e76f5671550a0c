//! The session replica. Records are compact (see [`Compact`]) because a
//! scheduler holds every session of the system; they are merged by version
//! (the shard sequence number of their last change), so deltas and snapshot
//! pages may arrive in any order and duplicates are harmless.

use std::collections::HashMap;
use tether_protocol::hash::BuildU64Hasher;
use tether_protocol::{SessionHash, SessionRecord, SnapshotPage, StateDelta, shard_of};

/// No affinity.
pub const NO_ENGINE: u16 = u16::MAX;

/// One session in the replica: 32 bytes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Compact {
    /// 0 for a provisional record (affinity noted from a decision or an
    /// event before any delta arrived).
    pub version: u64,
    pub cst: f32,
    pub attained: f32,
    pub wait: f32,
    /// Index of the affinity engine in the fleet, or [`NO_ENGINE`].
    pub affinity: u16,
    pub in_flight: u16,
    /// Seconds since the Unix epoch.
    pub last_active_s: u32,
    /// The affinity engine's KV-write counter (in 64-token units) at the
    /// session's last call there: for the freshness estimate. Kept by the
    /// scheduler itself (from events), not carried by deltas.
    pub mark: u32,
}

impl Compact {
    pub fn affinity(&self) -> Option<usize> {
        (self.affinity != NO_ENGINE).then_some(usize::from(self.affinity))
    }
}

/// Where a shard's stream of deltas stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShardSync {
    /// No snapshot yet, or a resync in progress.
    Unsynced,
    Synced {
        epoch: u64,
        seq: u64,
    },
}

/// What the caller must do after a delta.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaOutcome {
    InOrder,
    /// Lost deltas or a restarted shard: fetch a snapshot.
    NeedsResync,
    /// Applied while unsynced (a resync is, or should be, under way).
    Unsynced,
}

pub struct Replica {
    sessions: HashMap<SessionHash, Compact, BuildU64Hasher>,
    shards: Vec<ShardSync>,
    /// The epoch of each shard's records held here, whether synced or not.
    epochs: Vec<Option<u64>>,
    shard_count: u16,
}

impl Replica {
    pub fn new(shard_count: u16) -> Self {
        let n = usize::from(shard_count.max(1));
        Self {
            sessions: HashMap::default(),
            shards: vec![ShardSync::Unsynced; n],
            epochs: vec![None; n],
            shard_count: shard_count.max(1),
        }
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn get(&self, hash: SessionHash) -> Option<&Compact> {
        self.sessions.get(&hash)
    }

    pub fn shard_sync(&self, shard: u16) -> ShardSync {
        self.shards
            .get(usize::from(shard))
            .copied()
            .unwrap_or(ShardSync::Unsynced)
    }

    pub fn all_synced(&self) -> bool {
        self.shards
            .iter()
            .all(|s| matches!(s, ShardSync::Synced { .. }))
    }

    /// Upserts a record if it is newer than what is held.
    pub fn upsert(&mut self, r: &SessionRecord, engine_index: impl Fn(&str) -> Option<usize>) {
        let affinity = r
            .affinity
            .as_deref()
            .and_then(&engine_index)
            .and_then(|i| u16::try_from(i).ok())
            .unwrap_or(NO_ENGINE);
        let record = Compact {
            version: r.version,
            cst: r.cst as f32,
            attained: r.attained as f32,
            wait: r.wait as f32,
            affinity,
            in_flight: u16::try_from(r.in_flight).unwrap_or(u16::MAX),
            last_active_s: u32::try_from(r.last_active_ms / 1000).unwrap_or(u32::MAX),
            mark: 0,
        };
        match self.sessions.get_mut(&r.hash) {
            Some(held) if held.version > r.version => {}
            Some(held) => {
                *held = Compact {
                    mark: held.mark,
                    ..record
                }
            }
            None => {
                self.sessions.insert(r.hash, record);
            }
        }
    }

    /// Notes where a session's call was just sent or ran, and the engine's
    /// KV-write mark then. The affinity is only set on provisional records
    /// (before any delta arrives), so that a session's quick follow-up calls
    /// stay together; real records get their affinity from deltas.
    pub fn note_placement(&mut self, hash: SessionHash, engine: usize, mark: u32, now_s: u32) {
        let Ok(engine) = u16::try_from(engine) else {
            return;
        };
        let held = self.sessions.entry(hash).or_insert(Compact {
            version: 0,
            cst: 0.0,
            attained: 0.0,
            wait: 0.0,
            affinity: NO_ENGINE,
            in_flight: 0,
            last_active_s: now_s,
            mark,
        });
        held.mark = mark;
        if held.version == 0 {
            held.affinity = engine;
            held.last_active_s = now_s;
        }
    }

    /// Applies a delta and says whether it fit the shard's sequence.
    pub fn apply_delta(
        &mut self,
        d: &StateDelta,
        engine_index: impl Fn(&str) -> Option<usize>,
    ) -> DeltaOutcome {
        let i = usize::from(d.shard);
        if i >= self.shards.len() {
            return DeltaOutcome::Unsynced;
        }
        let restarted = self.adopt_epoch(d.shard, d.epoch);
        let outcome = match self.shards[i] {
            _ if restarted => DeltaOutcome::NeedsResync,
            ShardSync::Synced { epoch, seq } if d.seq == seq + 1 => {
                self.shards[i] = ShardSync::Synced { epoch, seq: d.seq };
                DeltaOutcome::InOrder
            }
            ShardSync::Synced { seq, .. } if d.seq <= seq => DeltaOutcome::InOrder,
            ShardSync::Synced { .. } => {
                self.shards[i] = ShardSync::Unsynced;
                DeltaOutcome::NeedsResync
            }
            ShardSync::Unsynced => DeltaOutcome::Unsynced,
        };
        for r in &d.updated {
            self.upsert(r, &engine_index);
        }
        for h in &d.evicted {
            self.sessions.remove(h);
        }
        outcome
    }

    /// Merges a snapshot page (during a resync).
    pub fn apply_page(
        &mut self,
        page: &SnapshotPage,
        engine_index: impl Fn(&str) -> Option<usize>,
    ) {
        if usize::from(page.shard) >= self.shards.len() {
            return;
        }
        self.adopt_epoch(page.shard, page.epoch);
        for r in &page.sessions {
            self.upsert(r, &engine_index);
        }
    }

    /// Records the shard's epoch; on a change (the shard restarted and lost its
    /// state) drops what is held of it and marks it unsynced. Returns whether
    /// it changed.
    fn adopt_epoch(&mut self, shard: u16, epoch: u64) -> bool {
        let i = usize::from(shard);
        match self.epochs[i] {
            Some(held) if held == epoch => false,
            Some(_) => {
                self.clear_shard(shard);
                self.shards[i] = ShardSync::Unsynced;
                self.epochs[i] = Some(epoch);
                true
            }
            None => {
                self.epochs[i] = Some(epoch);
                false
            }
        }
    }

    /// Drops everything held of a shard (before a full resync after a restart).
    pub fn clear_shard(&mut self, shard: u16) {
        let n = self.shard_count;
        self.sessions.retain(|h, _| shard_of(*h, n) != shard);
    }

    /// Marks a shard synchronised after its snapshot was loaded (unless its
    /// epoch changed meanwhile, in which case it stays unsynced).
    pub fn mark_synced(&mut self, shard: u16, epoch: u64, seq: u64) {
        let i = usize::from(shard);
        if i < self.shards.len() && self.epochs[i].is_none_or(|e| e == epoch) {
            self.epochs[i] = Some(epoch);
            self.shards[i] = ShardSync::Synced { epoch, seq };
        }
    }

    /// Shards not synchronised.
    pub fn unsynced(&self) -> impl Iterator<Item = u16> + '_ {
        (0..self.shard_count).filter(|s| self.shard_sync(*s) == ShardSync::Unsynced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(hash: u64, version: u64, cst: f64) -> SessionRecord {
        SessionRecord {
            hash,
            version,
            cst,
            attained: cst,
            wait: 0.0,
            in_flight: 0,
            requests: 1,
            affinity: Some("e1".into()),
            last_active_ms: 5000,
        }
    }

    fn idx(name: &str) -> Option<usize> {
        (name == "e1").then_some(1)
    }

    fn delta(shard: u16, epoch: u64, seq: u64, updated: Vec<SessionRecord>) -> StateDelta {
        StateDelta {
            shard,
            epoch,
            seq,
            updated,
            evicted: vec![],
        }
    }

    #[test]
    fn the_record_is_small() {
        assert!(std::mem::size_of::<Compact>() <= 32);
    }

    #[test]
    fn newer_versions_win_in_any_order() {
        let mut r = Replica::new(1);
        r.upsert(&rec(1, 5, 5.0), idx);
        r.upsert(&rec(1, 3, 3.0), idx);
        assert_eq!(r.get(1).map(|c| c.cst), Some(5.0));
        assert_eq!(r.get(1).and_then(Compact::affinity), Some(1));
    }

    #[test]
    fn gaps_and_restarts_ask_for_a_resync() {
        let mut r = Replica::new(2);
        assert_eq!(
            r.apply_delta(&delta(0, 9, 1, vec![]), idx),
            DeltaOutcome::Unsynced
        );
        r.mark_synced(0, 9, 1);
        assert_eq!(
            r.apply_delta(&delta(0, 9, 2, vec![rec(2, 2, 1.0)]), idx),
            DeltaOutcome::InOrder
        );
        assert_eq!(
            r.apply_delta(&delta(0, 9, 2, vec![]), idx),
            DeltaOutcome::InOrder
        );
        assert_eq!(
            r.apply_delta(&delta(0, 9, 4, vec![]), idx),
            DeltaOutcome::NeedsResync
        );
        assert_eq!(r.shard_sync(0), ShardSync::Unsynced);
        r.mark_synced(0, 9, 4);
        assert_eq!(r.shard_sync(0), ShardSync::Synced { epoch: 9, seq: 4 });
        // A new epoch clears the shard's sessions.
        assert!(r.get(2).is_some());
        assert_eq!(
            r.apply_delta(&delta(0, 10, 1, vec![]), idx),
            DeltaOutcome::NeedsResync
        );
        assert!(r.get(2).is_none());
    }

    #[test]
    fn provisional_affinity_yields_to_real_records() {
        let mut r = Replica::new(1);
        r.note_placement(7, 3, 11, 1);
        assert_eq!(r.get(7).and_then(Compact::affinity), Some(3));
        r.upsert(&rec(7, 1, 0.5), idx);
        assert_eq!(r.get(7).and_then(Compact::affinity), Some(1));
        assert_eq!(r.get(7).map(|c| c.mark), Some(11));
        r.note_placement(7, 3, 12, 2);
        assert_eq!(r.get(7).and_then(Compact::affinity), Some(1));
        assert_eq!(r.get(7).map(|c| c.mark), Some(12));
    }
}
