//! Placement: which engine runs a call.
//!
//! Bounded load (after Mirrokni et al., "Consistent Hashing with Bounded
//! Loads", 2018): an engine may take one more call while
//! `load + 1 ≤ (1 + ε) · (total + 1) / n + c`, where `total` is the fleet's
//! load over the `n` healthy engines. A session stays on its affinity engine
//! while that holds; otherwise it goes to the least-loaded healthy engine and
//! its affinity moves with it. Ties are broken by a rendezvous hash of the
//! session, so that equal loads spread sessions instead of piling them onto
//! the first engine.

use serde::{Deserialize, Serialize};
use tether_protocol::{RouteReason, hash::mix};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PlacementConfig {
    /// ε: how far above the fleet's mean an affinity engine may run.
    pub epsilon: f64,
    /// c: absolute slack in calls, so small fleets at low load keep affinity.
    pub slack: f64,
}

impl Default for PlacementConfig {
    fn default() -> Self {
        Self {
            epsilon: 0.5,
            slack: 4.0,
        }
    }
}

/// One engine as the policy sees it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EngineLoad {
    pub healthy: bool,
    /// Calls in flight (or a refined load estimate in the same unit).
    pub load: f64,
    /// A stable per-engine hash (of its name), for rendezvous tie-breaking.
    pub id_hash: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Placement {
    pub engine: usize,
    pub reason: RouteReason,
}

/// The healthy engines' count and load range and sum, from one pass: what
/// the bounded-load limit and the imbalance test read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FleetSummary {
    pub healthy: usize,
    pub min: f64,
    pub max: f64,
    /// Sum of the healthy engines' loads (negative loads count as 0).
    pub total: f64,
}

impl FleetSummary {
    pub fn of(engines: &[EngineLoad]) -> Self {
        let mut s = Self {
            healthy: 0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            total: 0.0,
        };
        for e in engines.iter().filter(|e| e.healthy) {
            s.healthy += 1;
            s.min = s.min.min(e.load);
            s.max = s.max.max(e.load);
            s.total += e.load.max(0.0);
        }
        s
    }

    /// The bounded-load limit for the next call on one engine.
    pub fn load_bound(&self, cfg: &PlacementConfig) -> f64 {
        if self.healthy == 0 {
            return 0.0;
        }
        (1.0 + cfg.epsilon.max(0.0)) * (self.total + 1.0) / self.healthy as f64 + cfg.slack.max(0.0)
    }
}

/// The bounded-load limit for the next call on one engine.
pub fn load_bound(cfg: &PlacementConfig, engines: &[EngineLoad]) -> f64 {
    FleetSummary::of(engines).load_bound(cfg)
}

/// The least-loaded healthy engine; ties go to the highest rendezvous score.
pub fn least_loaded(engines: &[EngineLoad], session_hash: u64) -> Option<usize> {
    // Two passes: the least load, then the rendezvous hash among the engines
    // at it only (hashing every engine per call cost more than the scan).
    // Loads are non-negative, so their bit patterns order like the numbers.
    let least = engines
        .iter()
        .filter(|e| e.healthy)
        .map(|e| e.load.max(0.0).to_bits())
        .min()?;
    engines
        .iter()
        .enumerate()
        .filter(|(_, e)| e.healthy && e.load.max(0.0).to_bits() == least)
        .max_by_key(|(_, e)| mix(e.id_hash, session_hash))
        .map(|(i, _)| i)
}

/// Rendezvous (highest-random-weight) hashing over the healthy engines:
/// load-blind, stable, and only the sessions of an engine that leaves move.
pub fn rendezvous(engines: &[EngineLoad], session_hash: u64) -> Option<usize> {
    engines
        .iter()
        .enumerate()
        .filter(|(_, e)| e.healthy)
        .max_by_key(|(_, e)| mix(e.id_hash, session_hash))
        .map(|(i, _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fleet(loads: &[f64]) -> Vec<EngineLoad> {
        loads
            .iter()
            .enumerate()
            .map(|(i, l)| EngineLoad {
                healthy: true,
                load: *l,
                id_hash: tether_protocol::stable_hash(format!("e{i}").as_bytes()),
            })
            .collect()
    }

    #[test]
    fn no_healthy_engine_no_placement() {
        let mut f = fleet(&[0.0, 0.0]);
        f.iter_mut().for_each(|e| e.healthy = false);
        assert_eq!(least_loaded(&f, 1), None);
        assert_eq!(rendezvous(&f, 1), None);
    }

    #[test]
    fn ties_spread_sessions() {
        let f = fleet(&[0.0; 4]);
        let mut hits = [0; 4];
        for s in 0..400u64 {
            hits[least_loaded(&f, tether_protocol::stable_hash(&s.to_le_bytes())).unwrap_or(0)] +=
                1;
        }
        assert!(hits.iter().all(|h| *h > 50), "{hits:?}");
    }

    proptest! {
        #[test]
        fn never_picks_an_unhealthy_engine(
            loads in proptest::collection::vec(0.0f64..100.0, 1..12),
            healthy in proptest::collection::vec(any::<bool>(), 12),
            session in any::<u64>(),
        ) {
            let mut f = fleet(&loads);
            for (e, h) in f.iter_mut().zip(&healthy) { e.healthy = *h; }
            for pick in [least_loaded(&f, session), rendezvous(&f, session)] {
                match pick {
                    Some(p) => prop_assert!(f[p].healthy),
                    None => prop_assert!(f.iter().all(|e| !e.healthy)),
                }
            }
        }
    }
}
