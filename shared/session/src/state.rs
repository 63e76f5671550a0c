//! One session's state.
//!
//! The ATLAS rule (Autellix, Luo et al. 2025), online form: a call inherits
//! the session's critical-path service `h` when it is admitted; when it
//! finishes after executing for `t`, `cst = max(cst, h + t)`. Parallel calls
//! of one session therefore raise the critical path by the longest of them,
//! not by their sum. PLAS's attained service is the plain sum of `t`. Wait is
//! summed.

use serde::{Deserialize, Serialize};
use tether_protocol::{CallId, EventKind, RequestEvent, SessionRecord};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionState {
    /// The session key as the client sent it (or the implicit key).
    pub key: String,
    /// Critical-path service (ATLAS), seconds.
    pub cst: f64,
    /// Total attained service (PLAS), seconds.
    pub attained: f64,
    /// Total wait, seconds.
    pub wait: f64,
    /// Calls dispatched and not finished, with their dispatch time (ms).
    pub in_flight: Vec<(CallId, u64)>,
    /// Calls dispatched, ever.
    pub requests: u64,
    /// The engine that ran the session's latest call.
    pub affinity: Option<String>,
    pub last_active_ms: u64,
    /// Shard sequence number of the last change (see [`SessionRecord::version`]).
    pub version: u64,
}

impl SessionState {
    pub fn new(key: String) -> Self {
        Self {
            key,
            ..Self::default()
        }
    }

    /// Applies one event. Negative or non-finite durations count as zero, so a
    /// bad clock on one ingress cannot corrupt a session.
    pub fn apply(&mut self, event: &RequestEvent) {
        self.last_active_ms = self.last_active_ms.max(event.at_ms);
        match &event.kind {
            EventKind::Dispatched { .. } => {
                if !self.in_flight.iter().any(|(id, _)| *id == event.call_id) {
                    self.in_flight.push((event.call_id, event.at_ms));
                    self.requests += 1;
                }
                self.affinity = Some(event.engine.clone());
            }
            EventKind::Finished(done) => {
                self.in_flight.retain(|(id, _)| *id != event.call_id);
                let h = sane(done.inherited_cst);
                let t = sane(done.executed);
                self.cst = self.cst.max(h + t);
                self.attained += t;
                self.wait += sane(done.waited);
                // A call refused or abandoned before dispatch never ran there.
                if done.wall > 0.0 {
                    self.affinity = Some(event.engine.clone());
                }
            }
        }
    }

    /// Forgets calls dispatched before `cutoff_ms` whose end never arrived
    /// (an ingress that died mid-call). Returns whether any were dropped.
    pub fn forget_calls_before(&mut self, cutoff_ms: u64) -> bool {
        let before = self.in_flight.len();
        self.in_flight.retain(|(_, at)| *at >= cutoff_ms);
        self.in_flight.len() != before
    }

    /// The wire form of this state.
    pub fn record(&self, hash: u64) -> SessionRecord {
        SessionRecord {
            hash,
            version: self.version,
            cst: self.cst,
            attained: self.attained,
            wait: self.wait,
            in_flight: u32::try_from(self.in_flight.len()).unwrap_or(u32::MAX),
            requests: self.requests,
            affinity: self.affinity.clone(),
            last_active_ms: self.last_active_ms,
        }
    }
}

fn sane(seconds: f64) -> f64 {
    if seconds.is_finite() && seconds > 0.0 {
        seconds
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_protocol::{Finished, Outcome};

    pub(crate) fn finished(call: u64, h: f64, t: f64, w: f64) -> RequestEvent {
        RequestEvent {
            call_id: call,
            session_hash: 1,
            session_key: "s".into(),
            at_ms: 1000 + call,
            engine: "e1".into(),
            kind: EventKind::Finished(Finished {
                inherited_cst: h,
                executed: t,
                waited: w,
                wall: t,
                prompt_tokens: 0,
                cached_tokens: 0,
                completion_tokens: 0,
                outcome: Outcome::Ok,
            }),
        }
    }

    #[test]
    fn atlas_sequence() {
        let mut s = SessionState::new("s".into());
        assert_eq!((s.cst, s.wait), (0.0, 0.0));
        s.apply(&finished(1, 0.0, 5.0, 2.0));
        assert_eq!((s.cst, s.wait), (5.0, 2.0));
        s.apply(&finished(2, 5.0, 3.0, 1.0));
        assert_eq!((s.cst, s.wait), (8.0, 3.0));
        assert_eq!(s.attained, 8.0);
        assert_eq!(s.affinity.as_deref(), Some("e1"));
    }

    #[test]
    fn parallel_calls_raise_the_critical_path_by_the_longest() {
        let mut s = SessionState::new("s".into());
        for i in 1..=100u64 {
            s.apply(&finished(i, 0.0, i as f64 / 1000.0, 0.010));
        }
        assert_eq!(s.cst, 0.100);
        assert!((s.wait - 1.0).abs() < 1e-9, "wait = {}", s.wait);
        assert!((s.attained - 5.05).abs() < 1e-9);
    }

    #[test]
    fn dispatch_tracks_in_flight_and_affinity() {
        let mut s = SessionState::new("s".into());
        let mut e = finished(7, 0.0, 0.0, 0.0);
        e.kind = EventKind::Dispatched {
            inherited_cst: 0.0,
            level: 0,
        };
        e.engine = "e2".into();
        s.apply(&e);
        s.apply(&e); // duplicate delivery is harmless
        assert_eq!(s.in_flight.len(), 1);
        assert_eq!(s.requests, 1);
        assert_eq!(s.affinity.as_deref(), Some("e2"));
        s.apply(&finished(7, 0.0, 1.0, 0.0));
        assert!(s.in_flight.is_empty());
    }

    #[test]
    fn bad_durations_count_as_zero() {
        let mut s = SessionState::new("s".into());
        s.apply(&finished(1, f64::NAN, -3.0, f64::INFINITY));
        assert_eq!((s.cst, s.attained, s.wait), (0.0, 0.0, 0.0));
    }
}
