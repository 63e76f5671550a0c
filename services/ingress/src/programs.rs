//! Which sessions are agent programs, as this ingress sees them: a session
//! whose call arrives while another of its calls is still in flight here
//! (queued or running) runs calls in parallel, and stays a program from
//! then on. Exact where the scheduler's replica is not: the replica learns
//! of a call's end through events and deltas a moment later, and a
//! conversation's next turn sent right after an answer would look parallel
//! there.
//!
//! Bounded: the set of sessions seen running in parallel is cleared when it
//! reaches its capacity (a cleared program is recognised again at its next
//! parallel call).

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

const SEEN_CAPACITY: usize = 100_000;

#[derive(Default)]
pub struct Programs {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    in_flight: HashMap<u64, u32>,
    parallel: HashSet<u64>,
}

impl Programs {
    /// A call of session `hash` arrives: counts it in flight and says
    /// whether the session is a program (it has run calls in parallel).
    pub fn enter(&self, hash: u64) -> bool {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let n = g.in_flight.entry(hash).or_insert(0);
        *n += 1;
        if *n > 1 {
            if g.parallel.len() >= SEEN_CAPACITY {
                g.parallel.clear();
            }
            g.parallel.insert(hash);
        }
        g.parallel.contains(&hash)
    }

    /// A call of session `hash` ended (or never got routed).
    pub fn leave(&self, hash: u64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = g.in_flight.get_mut(&hash) {
            *n -= 1;
            if *n == 0 {
                g.in_flight.remove(&hash);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_calls_are_not_a_program_parallel_ones_are_and_stay() {
        let p = Programs::default();
        // A conversation: each turn after the last ended.
        for _ in 0..5 {
            assert!(!p.enter(1));
            p.leave(1);
        }
        // A fan-out: the second call in flight makes it a program…
        assert!(!p.enter(2));
        assert!(p.enter(2));
        p.leave(2);
        p.leave(2);
        // …and the next step's first call is still one.
        assert!(p.enter(2));
        p.leave(2);
        assert!(
            p.inner
                .lock()
                .map(|g| g.in_flight.is_empty())
                .unwrap_or(false)
        );
    }
}
