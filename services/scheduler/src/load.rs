//! Engine load: calls in flight per engine as the system counts them.
//!
//! A call counts from the moment this scheduler decides it (so that a burst
//! of decisions spreads before any event arrives) or from its `Dispatched`
//! event (decisions of other replicas and local fallbacks of the ingress),
//! until its `Finished` event. Calls are keyed by id, so each counts once.
//! Calls whose end never arrives (an ingress died) stop counting after a
//! timeout.

use std::collections::HashMap;
use tether_protocol::CallId;
use tether_protocol::hash::BuildU64Hasher;

pub struct EngineLoads {
    calls: HashMap<CallId, (usize, u64), BuildU64Hasher>,
    in_flight: Vec<u32>,
}

impl EngineLoads {
    pub fn new(engines: usize) -> Self {
        Self {
            calls: HashMap::default(),
            in_flight: vec![0; engines],
        }
    }

    pub fn in_flight(&self, engine: usize) -> u32 {
        self.in_flight.get(engine).copied().unwrap_or(0)
    }

    pub fn start(&mut self, call: CallId, engine: usize, now_ms: u64) {
        if engine >= self.in_flight.len() {
            return;
        }
        match self.calls.get_mut(&call) {
            Some((held, _)) if *held == engine => {}
            Some((held, _)) => {
                // The ingress sent it elsewhere than decided (fallback): move it.
                self.in_flight[*held] = self.in_flight[*held].saturating_sub(1);
                *held = engine;
                self.in_flight[engine] += 1;
            }
            None => {
                self.calls.insert(call, (engine, now_ms));
                self.in_flight[engine] += 1;
            }
        }
    }

    pub fn finish(&mut self, call: CallId) {
        if let Some((engine, _)) = self.calls.remove(&call) {
            self.in_flight[engine] = self.in_flight[engine].saturating_sub(1);
        }
    }

    /// Forgets calls started before `cutoff_ms`.
    pub fn expire(&mut self, cutoff_ms: u64) -> usize {
        let stale: Vec<CallId> = self
            .calls
            .iter()
            .filter(|(_, (_, at))| *at < cutoff_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in &stale {
            self.finish(*id);
        }
        stale.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_each_call_once() {
        let mut l = EngineLoads::new(2);
        l.start(1, 0, 10);
        l.start(1, 0, 11);
        l.start(2, 1, 12);
        assert_eq!((l.in_flight(0), l.in_flight(1)), (1, 1));
        l.start(1, 1, 13); // moved by a fallback
        assert_eq!((l.in_flight(0), l.in_flight(1)), (0, 2));
        l.finish(1);
        l.finish(1);
        assert_eq!(l.in_flight(1), 1);
        assert_eq!(l.expire(100), 1);
        assert_eq!(l.in_flight(1), 0);
        l.start(3, 9, 0); // unknown engine: ignored
    }
}
