//! A shard's sessions. Owned by one actor; no locks.
//!
//! Memory is bounded: at most `max_sessions` sessions. When a new session
//! would pass the bound, up to a sixteenth of the table is evicted at once —
//! the least recently active of the sessions that are *idle*: no call in
//! flight and no activity within the idle TTL, as of the newcomer's event
//! time. A session active within the idle TTL is never evicted for a
//! newcomer: when no session is idle the newcomer is refused (not tracked;
//! the caller counts it). After a scan that found nothing idle, the table
//! remembers the earliest time any held session can become idle and refuses
//! newcomers before then without scanning again, so a flood of new keys costs
//! O(1) per key.
//!
//! Every decision depends only on the events and their order (event times,
//! not the wall clock), so replaying the same events gives the same table.
//!
//! A call's end may arrive before its dispatch (a publisher that sends an
//! unacknowledged `Dispatched` again after the `Finished` was stored): the
//! table remembers the last [`ENDED_EARLY`] calls that ended without being
//! in flight, and a dispatch of one of them does not put it in flight.

use std::collections::{HashMap, VecDeque};
use tether_protocol::{EventKind, RequestEvent, SessionHash, SessionRecord};

/// What applying one event did to the table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Sessions evicted to make room (usually none).
    pub evicted: Vec<SessionHash>,
    /// The event would have created a session at the cap while every held
    /// session was active: it was not applied.
    pub refused: bool,
}

use crate::SessionState;

#[derive(Clone, Copy, Debug)]
pub struct TableLimits {
    /// Sessions idle this long (and with no call in flight) are evicted.
    pub idle_ttl_ms: u64,
    /// A call in flight longer than this is assumed lost (its ingress died).
    pub call_timeout_ms: u64,
    /// Most sessions held; 0 means unbounded.
    pub max_sessions: usize,
}

impl Default for TableLimits {
    fn default() -> Self {
        Self {
            idle_ttl_ms: 30 * 60 * 1000,
            call_timeout_ms: 60 * 60 * 1000,
            max_sessions: 1_000_000,
        }
    }
}

/// Calls remembered as ended before their dispatch was seen.
pub const ENDED_EARLY: usize = 1024;

#[derive(Debug, Default)]
pub struct SessionTable {
    sessions: HashMap<SessionHash, SessionState>,
    /// Calls whose `Finished` came while they were not in flight, oldest first.
    ended_early: VecDeque<u64>,
    limits: TableLimits,
    /// No held session can be idle before this event time (ms): set by a
    /// scan at the cap that found none, cleared when sessions may have become
    /// idle by other means (lost calls forgotten).
    no_idle_before: u64,
}

impl SessionTable {
    pub fn new(limits: TableLimits) -> Self {
        Self {
            sessions: HashMap::new(),
            ended_early: VecDeque::new(),
            limits,
            no_idle_before: 0,
        }
    }

    /// A table holding `sessions` (restored from a snapshot).
    pub fn from_sessions(
        limits: TableLimits,
        sessions: impl IntoIterator<Item = (SessionHash, SessionState)>,
    ) -> Self {
        Self {
            sessions: sessions.into_iter().collect(),
            ended_early: VecDeque::new(),
            limits,
            no_idle_before: 0,
        }
    }

    /// Every session, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&SessionHash, &SessionState)> {
        self.sessions.iter()
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    pub fn get(&self, hash: SessionHash) -> Option<&SessionState> {
        self.sessions.get(&hash)
    }

    /// Applies an event, stamping the session with `version`. A new session
    /// at the cap first evicts idle sessions, or is refused when none is idle
    /// (see the module documentation).
    pub fn apply(&mut self, event: &RequestEvent, version: u64) -> Applied {
        let mut out = Applied::default();
        if !self.sessions.contains_key(&event.session_hash)
            && self.limits.max_sessions > 0
            && self.sessions.len() >= self.limits.max_sessions
        {
            out.evicted = self.evict_idle_for_newcomer(event.at_ms);
            if out.evicted.is_empty() {
                out.refused = true;
                return out;
            }
        }
        let state = self
            .sessions
            .entry(event.session_hash)
            .or_insert_with(|| SessionState::new(event.session_key.clone()));
        let call = event.call_id;
        match event.kind {
            EventKind::Finished(_) if !state.in_flight.iter().any(|(id, _)| *id == call) => {
                if self.ended_early.len() >= ENDED_EARLY {
                    self.ended_early.pop_front();
                }
                self.ended_early.push_back(call);
                state.apply(event);
            }
            EventKind::Dispatched { .. } if !self.ended_early.is_empty() => {
                state.apply(event);
                if let Some(i) = self.ended_early.iter().position(|id| *id == call) {
                    self.ended_early.remove(i);
                    state.in_flight.retain(|(id, _)| *id != call);
                }
            }
            _ => state.apply(event),
        }
        state.version = version;
        out
    }

    /// Evicts up to a sixteenth of the table, least recently active first,
    /// among the sessions idle at `now_ms` (no call in flight, inactive for
    /// the idle TTL). Empty when none is idle.
    fn evict_idle_for_newcomer(&mut self, now_ms: u64) -> Vec<SessionHash> {
        if now_ms < self.no_idle_before {
            return Vec::new();
        }
        let ttl = self.limits.idle_ttl_ms;
        let cutoff = now_ms.saturating_sub(ttl);
        let mut earliest = now_ms;
        let mut idle: Vec<(u64, SessionHash)> = Vec::new();
        for (h, s) in &self.sessions {
            if !s.in_flight.is_empty() {
                continue;
            }
            if s.last_active_ms < cutoff || (ttl == 0 && s.last_active_ms <= now_ms) {
                idle.push((s.last_active_ms, *h));
            } else {
                earliest = earliest.min(s.last_active_ms);
            }
        }
        if idle.is_empty() {
            // A session now in flight becomes idle no earlier than `now + ttl`
            // (its end event makes it active at its time).
            self.no_idle_before = earliest.saturating_add(ttl).saturating_add(1);
            return Vec::new();
        }
        let n = (self.limits.max_sessions / 16).clamp(1, idle.len());
        if n < idle.len() {
            idle.select_nth_unstable(n - 1);
        }
        let victims: Vec<SessionHash> = idle[..n].iter().map(|(_, h)| *h).collect();
        for h in &victims {
            self.sessions.remove(h);
        }
        victims
    }

    /// Evicts sessions idle since before `now_ms - idle_ttl` with no call in
    /// flight, after forgetting calls older than the call timeout. Returns the
    /// evicted hashes and the hashes whose in-flight set changed.
    pub fn evict_idle(&mut self, now_ms: u64) -> (Vec<SessionHash>, Vec<SessionHash>) {
        let idle_cutoff = now_ms.saturating_sub(self.limits.idle_ttl_ms);
        let call_cutoff = now_ms.saturating_sub(self.limits.call_timeout_ms);
        let mut changed = Vec::new();
        let mut evicted = Vec::new();
        for (hash, s) in &mut self.sessions {
            if s.forget_calls_before(call_cutoff) {
                // Sessions with no call left may be idle now.
                self.no_idle_before = 0;
                changed.push(*hash);
            }
            if s.in_flight.is_empty() && s.last_active_ms < idle_cutoff {
                evicted.push(*hash);
            }
        }
        for hash in &evicted {
            self.sessions.remove(hash);
        }
        changed.retain(|h| self.sessions.contains_key(h));
        (evicted, changed)
    }

    /// Marks `hashes` as changed at `version` (after [`Self::evict_idle`]
    /// changed them).
    pub fn touch(&mut self, hashes: &[SessionHash], version: u64) {
        for h in hashes {
            if let Some(s) = self.sessions.get_mut(h) {
                s.version = version;
            }
        }
    }

    /// Up to `limit` records with hash greater than `after`, in hash order,
    /// and the cursor for the next page.
    pub fn page(
        &self,
        after: Option<SessionHash>,
        limit: usize,
    ) -> (Vec<SessionRecord>, Option<SessionHash>) {
        let mut keys: Vec<SessionHash> = self
            .sessions
            .keys()
            .copied()
            .filter(|h| after.is_none_or(|a| *h > a))
            .collect();
        let limit = limit.max(1);
        let more = keys.len() > limit;
        if more {
            keys.select_nth_unstable(limit - 1);
            keys.truncate(limit);
        }
        keys.sort_unstable();
        let next = if more { keys.last().copied() } else { None };
        let records = keys
            .iter()
            .filter_map(|h| self.sessions.get(h).map(|s| s.record(*h)))
            .collect();
        (records, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_protocol::{Finished, Outcome};

    fn event(session: u64, at_ms: u64) -> RequestEvent {
        RequestEvent {
            call_id: at_ms,
            session_hash: session,
            session_key: format!("s{session}"),
            at_ms,
            engine: "e".into(),
            kind: EventKind::Finished(Finished {
                inherited_cst: 0.0,
                executed: 1.0,
                waited: 0.0,
                wall: 1.0,
                prompt_tokens: 0,
                cached_tokens: 0,
                completion_tokens: 0,
                outcome: Outcome::Ok,
            }),
        }
    }

    #[test]
    fn sessions_are_isolated() {
        let mut t = SessionTable::new(TableLimits::default());
        t.apply(&event(1, 10), 1);
        t.apply(&event(1, 11), 2);
        t.apply(&event(2, 12), 3);
        assert_eq!(t.get(1).map(|s| s.attained), Some(2.0));
        assert_eq!(t.get(2).map(|s| s.attained), Some(1.0));
        assert_eq!(t.get(2).map(|s| s.version), Some(3));
    }

    #[test]
    fn an_end_before_its_dispatch_leaves_nothing_in_flight() {
        let mut t = SessionTable::new(TableLimits::default());
        let done = event(1, 10);
        let mut dispatched = done.clone();
        dispatched.at_ms = 9;
        dispatched.kind = EventKind::Dispatched {
            inherited_cst: 0.0,
            level: 0,
        };
        t.apply(&done, 1);
        t.apply(&dispatched, 2);
        let s = t.get(1).expect("session");
        assert!(s.in_flight.is_empty(), "{:?}", s.in_flight);
        assert_eq!(s.requests, 1);
        // In order, the same call is in flight between the two.
        let mut t = SessionTable::new(TableLimits::default());
        t.apply(&dispatched, 1);
        assert_eq!(t.get(1).map(|s| s.in_flight.len()), Some(1));
        t.apply(&done, 2);
        assert_eq!(t.get(1).map(|s| s.in_flight.len()), Some(0));
    }

    #[test]
    fn idle_eviction_removes_only_stale_sessions() {
        let limits = TableLimits {
            idle_ttl_ms: 1000,
            ..TableLimits::default()
        };
        let mut t = SessionTable::new(limits);
        t.apply(&event(1, 100), 1); // stale at now = 2000
        t.apply(&event(2, 1500), 2); // fresh
        let mut busy = event(3, 50); // stale but with a call in flight
        busy.kind = EventKind::Dispatched {
            inherited_cst: 0.0,
            level: 0,
        };
        t.apply(&busy, 3);
        let (evicted, _) = t.evict_idle(2000);
        assert_eq!(evicted, vec![1]);
        assert!(t.get(2).is_some() && t.get(3).is_some());
    }

    #[test]
    fn lost_calls_are_forgotten_after_the_call_timeout() {
        let limits = TableLimits {
            idle_ttl_ms: 1000,
            call_timeout_ms: 5000,
            max_sessions: 0,
        };
        let mut t = SessionTable::new(limits);
        let mut busy = event(3, 50);
        busy.kind = EventKind::Dispatched {
            inherited_cst: 0.0,
            level: 0,
        };
        t.apply(&busy, 1);
        let (evicted, changed) = t.evict_idle(6000);
        assert_eq!(changed, Vec::<u64>::new());
        assert_eq!(evicted, vec![3]);
    }

    #[test]
    fn the_table_is_bounded_and_evicts_idle_sessions_first() {
        let limits = TableLimits {
            max_sessions: 32,
            idle_ttl_ms: 50,
            ..TableLimits::default()
        };
        let mut t = SessionTable::new(limits);
        for s in 0..100u64 {
            let applied = t.apply(&event(s, 1000 + s * 100), s);
            assert!(!applied.refused, "session {s} refused");
            assert!(t.len() <= 32);
        }
        // The most recent session is always kept.
        assert!(t.get(99).is_some());
        assert!(t.get(0).is_none());
    }

    #[test]
    fn a_flood_of_new_keys_never_evicts_an_active_session() {
        let limits = TableLimits {
            max_sessions: 64,
            idle_ttl_ms: 60_000,
            ..TableLimits::default()
        };
        let mut t = SessionTable::new(limits);
        // An old idle session, a live one, and one with a call in flight
        // since long ago.
        t.apply(&event(1, 1_000), 1);
        t.apply(&event(2, 100_000), 2);
        let mut busy = event(3, 2_000);
        busy.kind = EventKind::Dispatched {
            inherited_cst: 0.0,
            level: 0,
        };
        t.apply(&busy, 3);
        let mut refused = 0;
        let mut evicted = Vec::new();
        for i in 0..5_000u64 {
            let a = t.apply(&event(1_000_000 + i, 100_500 + i / 100), 4);
            refused += u64::from(a.refused);
            evicted.extend(a.evicted);
            assert!(t.len() <= 64);
        }
        // Only the idle session went; the live and the busy ones stay.
        assert_eq!(evicted, vec![1]);
        assert!(t.get(2).is_some() && t.get(3).is_some());
        assert_eq!(refused, 5_000 - 62);
        // Once the table's sessions are idle, newcomers get in again.
        let later = t.apply(&event(9, 100_500 + 60_000 + 1_000), 5);
        assert!(!later.refused);
        assert!(!later.evicted.is_empty());
        assert!(t.get(9).is_some() && t.get(3).is_some());
    }

    #[test]
    fn pages_cover_the_table_once() {
        let mut t = SessionTable::new(TableLimits::default());
        for s in 0..50u64 {
            t.apply(&event(s * 7919 % 1000, s), s);
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (records, next) = t.page(after, 7);
            seen.extend(records.iter().map(|r| r.hash));
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        let mut sorted = seen.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(seen, sorted);
        assert_eq!(seen.len(), t.len());
    }
}
