//! Routing strategies: Tether's own and the baselines it is measured against,
//! selectable by configuration so the same system can run each.
//!
//! - `round-robin` — healthy engines in turn; load- and session-blind.
//! - `least-loaded` — the engine with the fewest calls in flight.
//! - `session-hash` — rendezvous hash of the session; load-blind stickiness.
//! - `cache-aware` — after SGLang's router: when the fleet is imbalanced
//!   (`max − min > abs` and `max > rel · min`) the least-loaded engine; else
//!   the engine with the longest prefix match when its match ratio beats a
//!   threshold; else the least-loaded engine.
//! - `tether` (default) — the engine with the longest prefix match across
//!   all sessions' blocks (the session's own engine winning ties) within the
//!   bounded load; without a match worth following, the session's engine
//!   while its cache is probably fresh (a bound that shrinks with
//!   freshness); else the least-loaded engine. Affinity is one signal: it
//!   never overrides a better prefix match elsewhere, nor the load bound.

use serde::{Deserialize, Serialize};
use tether_protocol::RouteReason;

use crate::placement::{
    EngineLoad, FleetSummary, Placement, PlacementConfig, least_loaded, rendezvous,
};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    RoundRobin,
    LeastLoaded,
    SessionHash,
    CacheAware,
    #[default]
    Tether,
}

impl Strategy {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "round-robin" => Ok(Self::RoundRobin),
            "least-loaded" => Ok(Self::LeastLoaded),
            "session-hash" => Ok(Self::SessionHash),
            "cache-aware" => Ok(Self::CacheAware),
            "tether" => Ok(Self::Tether),
            other => Err(format!(
                "unknown strategy {other:?}: round-robin, least-loaded, session-hash, cache-aware or tether"
            )),
        }
    }
}

/// SGLang-style cache-aware thresholds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CacheAwareConfig {
    /// Imbalanced when `max − min > balance_abs` …
    pub balance_abs: f64,
    /// … and `max > balance_rel · min`.
    pub balance_rel: f64,
    /// A prefix match counts when it covers more than this share of the prompt.
    pub match_threshold: f64,
}

impl Default for CacheAwareConfig {
    fn default() -> Self {
        Self {
            balance_abs: 64.0,
            balance_rel: 1.5,
            match_threshold: 0.3,
        }
    }
}

/// What the strategies know of the call's session.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affinity {
    pub engine: usize,
    /// Estimated probability, 0..=1, that the engine still holds the
    /// session's cache (see [`freshness`]).
    pub freshness: f64,
}

/// Everything a strategy reads for one call.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    pub engines: &'a [EngineLoad],
    /// Share of the prompt's blocks each engine probably holds (0..=1), by
    /// engine index; empty when unknown.
    pub prefix_match: &'a [f64],
    pub affinity: Option<Affinity>,
    pub session_hash: u64,
    /// A counter for round-robin (the caller increments it per call).
    pub turn: u64,
}

/// Freshness of a session's cache on an engine: `1 − tokens_since / capacity`,
/// clamped to 0..=1, where `tokens_since` is the KV the engine has written
/// since the session's last call there and `capacity` the engine's cache size
/// in tokens. An engine that has written a whole cache's worth since has
/// probably evicted the session (LRU), so its affinity is worth nothing.
pub fn freshness(tokens_since: f64, capacity: f64) -> f64 {
    if capacity <= 0.0 || !tokens_since.is_finite() {
        return 0.0;
    }
    (1.0 - tokens_since.max(0.0) / capacity).clamp(0.0, 1.0)
}

/// Chooses an engine. None when no engine is healthy.
pub fn choose(
    strategy: Strategy,
    placement: &PlacementConfig,
    cache: &CacheAwareConfig,
    x: &Inputs<'_>,
) -> Option<Placement> {
    // One pass over the fleet for the count, range and sum every rule reads.
    let fleet = FleetSummary::of(x.engines);
    let healthy = fleet.healthy;
    if healthy == 0 {
        return None;
    }
    let least =
        |reason| least_loaded(x.engines, x.session_hash).map(|engine| Placement { engine, reason });
    match strategy {
        Strategy::RoundRobin => {
            let nth = usize::try_from(x.turn % healthy as u64).unwrap_or(0);
            let engine = x
                .engines
                .iter()
                .enumerate()
                .filter(|(_, e)| e.healthy)
                .nth(nth)?
                .0;
            Some(Placement {
                engine,
                reason: RouteReason::Baseline,
            })
        }
        Strategy::LeastLoaded => least(RouteReason::LeastLoaded),
        Strategy::SessionHash => rendezvous(x.engines, x.session_hash).map(|engine| Placement {
            engine,
            reason: RouteReason::Baseline,
        }),
        Strategy::CacheAware => {
            if imbalanced(cache, &fleet) {
                return least(RouteReason::LeastLoaded);
            }
            match best_match(x) {
                Some((engine, ratio)) if ratio > cache.match_threshold => Some(Placement {
                    engine,
                    reason: RouteReason::PrefixMatch,
                }),
                _ => least(RouteReason::LeastLoaded),
            }
        }
        Strategy::Tether => {
            // An imbalanced fleet is rebalanced first, as the cache-aware
            // routers do (measured: a tighter bound here cost prefix hits
            // under load and won nothing).
            if imbalanced(cache, &fleet) {
                return least(RouteReason::Rebalanced);
            }
            // The best prefix match across all sessions' blocks; the
            // session's own engine wins ties (it holds the same prefix and
            // probably more of its history).
            if let Some((engine, ratio)) = best_match_preferring(x, x.affinity.map(|a| a.engine))
                && ratio > cache.match_threshold
            {
                let reason = if x.affinity.is_some_and(|a| a.engine == engine) {
                    RouteReason::Affinity
                } else {
                    RouteReason::PrefixMatch
                };
                return Some(Placement { engine, reason });
            }
            // No prefix worth following: the session's engine while its
            // cache is probably fresh, under a bound that shrinks with
            // freshness (a stale session is placed like a new one).
            if let Some(a) = x.affinity.filter(|a| a.freshness > 0.0)
                && let Some(e) = x.engines.get(a.engine).filter(|e| e.healthy)
            {
                let scaled = PlacementConfig {
                    epsilon: placement.epsilon * a.freshness,
                    slack: placement.slack * a.freshness,
                };
                if e.load + 1.0 <= fleet.load_bound(&scaled) {
                    return Some(Placement {
                        engine: a.engine,
                        reason: RouteReason::Affinity,
                    });
                }
                return least(RouteReason::Rebalanced);
            }
            least(RouteReason::LeastLoaded)
        }
    }
}

/// The cache-aware routers' imbalance test over the healthy engines:
/// `max − min > balance_abs` and `max > balance_rel · min`.
fn imbalanced(cache: &CacheAwareConfig, fleet: &FleetSummary) -> bool {
    fleet.max - fleet.min > cache.balance_abs && fleet.max > cache.balance_rel * fleet.min
}

/// As [`best_match`], with `preferred` winning ties of the ratio.
fn best_match_preferring(x: &Inputs<'_>, preferred: Option<usize>) -> Option<(usize, f64)> {
    let best = best_match(x)?;
    match preferred {
        Some(p) if p != best.0 && x.engines.get(p).is_some_and(|e| e.healthy) => {
            let r = x.prefix_match.get(p).copied().unwrap_or(0.0);
            Some(if r >= best.1 { (p, r) } else { best })
        }
        _ => Some(best),
    }
}

/// The healthy engine with the longest prefix match (ties: less load).
fn best_match(x: &Inputs<'_>) -> Option<(usize, f64)> {
    x.prefix_match
        .iter()
        .enumerate()
        .filter(|(i, r)| **r > 0.0 && x.engines.get(*i).is_some_and(|e| e.healthy))
        .max_by(|(a, ra), (b, rb)| {
            ra.total_cmp(rb)
                .then_with(|| x.engines[*b].load.total_cmp(&x.engines[*a].load))
        })
        .map(|(i, r)| (i, *r))
}

#[cfg(test)]
mod tests {
    use super::Strategy;
    use super::*;
    use crate::placement::load_bound;
    use proptest::prelude::{Just, any, prop_assert, prop_assert_eq, prop_oneof, proptest};

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

    fn inputs<'a>(
        engines: &'a [EngineLoad],
        prefix: &'a [f64],
        affinity: Option<Affinity>,
    ) -> Inputs<'a> {
        Inputs {
            engines,
            prefix_match: prefix,
            affinity,
            session_hash: 42,
            turn: 0,
        }
    }

    #[test]
    fn freshness_falls_with_traffic_since() {
        assert_eq!(freshness(0.0, 1000.0), 1.0);
        assert_eq!(freshness(250.0, 1000.0), 0.75);
        assert_eq!(freshness(5000.0, 1000.0), 0.0);
        assert_eq!(freshness(1.0, 0.0), 0.0);
    }

    #[test]
    fn stale_affinity_is_placed_like_a_new_session() {
        let f = fleet(&[2.0, 0.0, 0.0]);
        let pc = PlacementConfig::default();
        let cc = CacheAwareConfig::default();
        let fresh = choose(
            Strategy::Tether,
            &pc,
            &cc,
            &inputs(
                &f,
                &[],
                Some(Affinity {
                    engine: 0,
                    freshness: 1.0,
                }),
            ),
        );
        assert_eq!(fresh.map(|p| p.reason), Some(RouteReason::Affinity));
        let stale = choose(
            Strategy::Tether,
            &pc,
            &cc,
            &inputs(
                &f,
                &[],
                Some(Affinity {
                    engine: 0,
                    freshness: 0.0,
                }),
            ),
        );
        assert_eq!(stale.map(|p| p.reason), Some(RouteReason::LeastLoaded));
        assert_ne!(stale.map(|p| p.engine), Some(0));
    }

    #[test]
    fn a_better_prefix_elsewhere_beats_affinity_and_ties_stay() {
        let f = fleet(&[1.0, 1.0, 1.0]);
        let (pc, cc) = (PlacementConfig::default(), CacheAwareConfig::default());
        let aff = Some(Affinity {
            engine: 0,
            freshness: 1.0,
        });
        // Another session's shared document is on engine 2: it covers more.
        let p = choose(
            Strategy::Tether,
            &pc,
            &cc,
            &inputs(&f, &[0.4, 0.0, 0.9], aff),
        );
        assert_eq!(
            p,
            Some(Placement {
                engine: 2,
                reason: RouteReason::PrefixMatch
            })
        );
        // Equal matches: the session's own engine.
        let p = choose(
            Strategy::Tether,
            &pc,
            &cc,
            &inputs(&f, &[0.9, 0.0, 0.9], aff),
        );
        assert_eq!(
            p,
            Some(Placement {
                engine: 0,
                reason: RouteReason::Affinity
            })
        );
        // An imbalanced fleet yields to load.
        let busy = fleet(&[1.0, 1.0, 80.0]);
        let p = choose(
            Strategy::Tether,
            &pc,
            &cc,
            &inputs(&busy, &[0.0, 0.0, 0.9], None),
        );
        assert_eq!(p.map(|p| p.reason), Some(RouteReason::Rebalanced));
    }

    #[test]
    fn cache_aware_follows_sglang() {
        let cc = CacheAwareConfig::default();
        let pc = PlacementConfig::default();
        // Balanced: best match wins.
        let f = fleet(&[10.0, 3.0, 5.0]);
        let p = choose(
            Strategy::CacheAware,
            &pc,
            &cc,
            &inputs(&f, &[0.9, 0.0, 0.1], None),
        );
        assert_eq!(
            p,
            Some(Placement {
                engine: 0,
                reason: RouteReason::PrefixMatch
            })
        );
        // Weak match: least loaded.
        let p = choose(
            Strategy::CacheAware,
            &pc,
            &cc,
            &inputs(&f, &[0.2, 0.0, 0.1], None),
        );
        assert_eq!(
            p,
            Some(Placement {
                engine: 1,
                reason: RouteReason::LeastLoaded
            })
        );
        // Imbalanced (80 − 2 > 64 and 80 > 1.5·2): least loaded despite the match.
        let f = fleet(&[80.0, 2.0, 5.0]);
        let p = choose(
            Strategy::CacheAware,
            &pc,
            &cc,
            &inputs(&f, &[0.9, 0.0, 0.1], None),
        );
        assert_eq!(
            p,
            Some(Placement {
                engine: 1,
                reason: RouteReason::LeastLoaded
            })
        );
    }

    #[test]
    fn round_robin_takes_turns_over_healthy_engines() {
        let mut f = fleet(&[0.0; 3]);
        f[1].healthy = false;
        let pc = PlacementConfig::default();
        let cc = CacheAwareConfig::default();
        let picks: Vec<usize> = (0..4)
            .filter_map(|t| {
                choose(
                    Strategy::RoundRobin,
                    &pc,
                    &cc,
                    &Inputs {
                        turn: t,
                        ..inputs(&f, &[], None)
                    },
                )
                .map(|p| p.engine)
            })
            .collect();
        assert_eq!(picks, vec![0, 2, 0, 2]);
    }

    fn strategy() -> impl proptest::strategy::Strategy<Value = super::Strategy> {
        prop_oneof![
            Just(Strategy::RoundRobin),
            Just(Strategy::LeastLoaded),
            Just(Strategy::SessionHash),
            Just(Strategy::CacheAware),
            Just(Strategy::Tether),
        ]
    }

    proptest! {
        #[test]
        fn every_strategy_picks_healthy_engines_deterministically(
            s in strategy(),
            loads in proptest::collection::vec(0.0f64..100.0, 1..16),
            healthy in proptest::collection::vec(any::<bool>(), 16),
            prefix in proptest::collection::vec(0.0f64..1.0, 0..16),
            affinity in proptest::option::of((0usize..16, 0.0f64..1.0)),
            hash in any::<u64>(),
            turn in any::<u64>(),
        ) {
            let mut f = fleet(&loads);
            for (e, h) in f.iter_mut().zip(&healthy) { e.healthy = *h; }
            let x = Inputs {
                engines: &f, prefix_match: &prefix,
                affinity: affinity.map(|(engine, freshness)| Affinity { engine, freshness }),
                session_hash: hash, turn,
            };
            let (pc, cc) = (PlacementConfig::default(), CacheAwareConfig::default());
            let p = choose(s, &pc, &cc, &x);
            match p {
                Some(p) => prop_assert!(f[p.engine].healthy),
                None => prop_assert!(f.iter().all(|e| !e.healthy)),
            }
            prop_assert_eq!(p, choose(s, &pc, &cc, &x));
        }

        /// When the fleet is imbalanced, Tether takes a least-loaded engine;
        /// it never takes a fresh affinity engine above the bounded load
        /// without a prefix match to justify it.
        #[test]
        fn tether_yields_to_load(
            loads in proptest::collection::vec(0.0f64..160.0, 2..16),
            prefix in proptest::collection::vec(0.0f64..1.0, 0..16),
            affinity in proptest::option::of((0usize..16, 0.0f64..=1.0)),
            hash in any::<u64>(),
        ) {
            let f = fleet(&loads);
            let (pc, cc) = (PlacementConfig::default(), CacheAwareConfig::default());
            let x = Inputs {
                engines: &f, prefix_match: &prefix,
                affinity: affinity.map(|(engine, freshness)| Affinity { engine, freshness }),
                session_hash: hash, turn: 0,
            };
            let min = loads.iter().copied().fold(f64::INFINITY, f64::min);
            if let Some(p) = choose(Strategy::Tether, &pc, &cc, &x) {
                if imbalanced(&cc, &FleetSummary::of(&f)) {
                    prop_assert_eq!(f[p.engine].load, min);
                }
                if p.reason == RouteReason::Affinity && prefix.get(p.engine).copied().unwrap_or(0.0) <= cc.match_threshold {
                    prop_assert!(f[p.engine].load + 1.0 <= load_bound(&pc, &f));
                }
            }
        }
    }
}
