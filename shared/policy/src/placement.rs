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

/// The bounded-load limit for the next call on one engine.
pub fn load_bound(cfg: &PlacementConfig, engines: &[EngineLoad]) -> f64 {
    let (n, total) = engines
        .iter()
        .filter(|e| e.healthy)
        .fold((0usize, 0.0), |(n, t), e| (n + 1, t + e.load.max(0.0)));
    if n == 0 {
        return 0.0;
    }
    (1.0 + cfg.epsilon.max(0.0)) * (total + 1.0) / n as f64 + cfg.slack.max(0.0)
}

/// Places a call of a session. `affinity` is the index of the session's
/// affinity engine, if it has one worth keeping. None when no engine is healthy.
pub fn place(
    cfg: &PlacementConfig,
    engines: &[EngineLoad],
    affinity: Option<usize>,
    session_hash: u64,
) -> Option<Placement> {
    if let Some(a) = affinity
        && let Some(e) = engines.get(a)
        && e.healthy
        && e.load + 1.0 <= load_bound(cfg, engines)
    {
        return Some(Placement {
            engine: a,
            reason: RouteReason::Affinity,
        });
    }
    let engine = least_loaded(engines, session_hash)?;
    let reason = match affinity {
        Some(a) if engines.get(a).is_some_and(|e| e.healthy) => RouteReason::Rebalanced,
        _ => RouteReason::LeastLoaded,
    };
    Some(Placement { engine, reason })
}

/// The least-loaded healthy engine; ties go to the highest rendezvous score.
pub fn least_loaded(engines: &[EngineLoad], session_hash: u64) -> Option<usize> {
    engines
        .iter()
        .enumerate()
        .filter(|(_, e)| e.healthy)
        // Loads are non-negative, so their bit patterns order like the
        // numbers; each engine's key is computed once.
        .min_by_key(|(_, e)| {
            (
                e.load.max(0.0).to_bits(),
                u64::MAX - mix(e.id_hash, session_hash),
            )
        })
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
    fn affinity_holds_under_the_bound() {
        let cfg = PlacementConfig::default();
        let p = place(&cfg, &fleet(&[3.0, 0.0, 0.0, 0.0]), Some(0), 1);
        assert_eq!(
            p,
            Some(Placement {
                engine: 0,
                reason: RouteReason::Affinity
            })
        );
    }

    #[test]
    fn overloaded_affinity_moves_to_least_loaded() {
        let cfg = PlacementConfig::default();
        let p = place(&cfg, &fleet(&[20.0, 2.0, 1.0, 3.0]), Some(0), 1);
        assert_eq!(
            p,
            Some(Placement {
                engine: 2,
                reason: RouteReason::Rebalanced
            })
        );
    }

    #[test]
    fn no_healthy_engine_no_placement() {
        let mut f = fleet(&[0.0, 0.0]);
        f.iter_mut().for_each(|e| e.healthy = false);
        assert_eq!(place(&PlacementConfig::default(), &f, Some(0), 1), None);
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
            affinity in proptest::option::of(0usize..12),
            session in any::<u64>(),
        ) {
            let mut f = fleet(&loads);
            for (e, h) in f.iter_mut().zip(&healthy) { e.healthy = *h; }
            match place(&PlacementConfig::default(), &f, affinity, session) {
                Some(p) => prop_assert!(f[p.engine].healthy),
                None => prop_assert!(f.iter().all(|e| !e.healthy)),
            }
        }

        #[test]
        fn the_chosen_engine_respects_the_bound_or_is_least_loaded(
            loads in proptest::collection::vec(0.0f64..100.0, 1..12),
            affinity in proptest::option::of(0usize..12),
            session in any::<u64>(),
        ) {
            let cfg = PlacementConfig::default();
            let f = fleet(&loads);
            let p = place(&cfg, &f, affinity, session);
            prop_assert!(p.is_some());
            let p = p.unwrap_or(Placement { engine: 0, reason: RouteReason::LeastLoaded });
            let min = f.iter().map(|e| e.load).fold(f64::INFINITY, f64::min);
            prop_assert!(f[p.engine].load + 1.0 <= load_bound(&cfg, &f) || f[p.engine].load == min);
            // Deterministic for equal inputs.
            prop_assert_eq!(Some(p), place(&cfg, &f, affinity, session));
        }
    }
}
