//! Capacity control: how many calls the gateway lets run on an engine at
//! once, learned from the engine's own signals, so that calls wait at the
//! gateway (where Tether orders them and binds them late) instead of in the
//! engine's waiting queue — without idling the engine.
//!
//! The rule, applied on every scrape of the engine's metrics (vLLM
//! `num_requests_waiting`, `kv_cache_usage_perc`; SGLang's equivalents):
//!
//! - **Back off** when the engine queues more than `target_waiting` calls
//!   on two scrapes in a row (a queue that persists; a call sent a moment
//!   ago waits for the engine's next step, and that is no congestion):
//!   the engine runs `in_use − waiting` of the gateway's calls, so the limit
//!   becomes `in_use − (waiting − target_waiting)` (never above the current
//!   limit). Calls already sent stay where they are.
//! - **Probe up** when the gateway holds calls back (some wait, and the
//!   engine has all its limit in use), the engine queues at most
//!   `target_waiting` and its KV cache is below `kv_high`: the limit grows
//!   by `max(1, limit / 8)`.
//! - Otherwise keep the limit. It stays within `[1, max]`, `max` being the
//!   engine's `max_concurrency` share (the fleet file).
//!
//! Like TCP's congestion control, it is additive-ish increase and a direct
//! cut on the congestion signal; the signal is the engine's queue, not loss.

/// The knobs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CapacityConfig {
    /// Learn limits from engine signals (false: the fleet file's
    /// `max_concurrency` is the fixed limit).
    pub enabled: bool,
    /// Calls the engine may queue before the gateway backs off. One keeps a
    /// call staged for the engine's next step, so a freed seat never idles
    /// for a gateway round trip.
    pub target_waiting: f64,
    /// KV-cache usage (0..=1) above which the limit does not grow.
    pub kv_high: f64,
}

impl Default for CapacityConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            target_waiting: 1.0,
            kv_high: 0.95,
        }
    }
}

/// What the engine and the gateway know of one engine at a scrape.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CapacitySignal {
    /// The gateway's current limit for the engine.
    pub limit: usize,
    /// The most the limit may be (`max_concurrency` share).
    pub max: usize,
    /// Calls the gateway has running on the engine.
    pub in_use: usize,
    /// Whether calls wait at the gateway.
    pub demand: bool,
    /// The engine's waiting queue as it reports it: the least of the last
    /// two scrapes.
    pub engine_waiting: f64,
    /// The engine's KV-cache usage, 0..=1.
    pub kv_usage: f64,
}

/// The next limit under the rule in the module docs.
pub fn next_limit(cfg: &CapacityConfig, s: &CapacitySignal) -> usize {
    let max = s.max.max(1);
    if !cfg.enabled {
        return max;
    }
    let limit = s.limit.clamp(1, max);
    let waiting = if s.engine_waiting.is_finite() {
        s.engine_waiting.max(0.0)
    } else {
        0.0
    };
    let target = cfg.target_waiting.max(0.0);
    if waiting > target {
        let excess = (waiting - target).ceil() as usize;
        return s.in_use.saturating_sub(excess).clamp(1, limit);
    }
    if s.demand && s.in_use >= limit && s.kv_usage < cfg.kv_high {
        return (limit + (limit / 8).max(1)).min(max);
    }
    limit
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sig(limit: usize, in_use: usize, demand: bool, waiting: f64, kv: f64) -> CapacitySignal {
        CapacitySignal {
            limit,
            max: 256,
            in_use,
            demand,
            engine_waiting: waiting,
            kv_usage: kv,
        }
    }

    #[test]
    fn backs_off_to_what_the_engine_runs() {
        let c = CapacityConfig::default();
        // 40 sent, the engine queues 12: it runs 28; keep one staged.
        assert_eq!(next_limit(&c, &sig(256, 40, true, 12.0, 0.9)), 29);
        // Never to zero.
        assert_eq!(next_limit(&c, &sig(4, 2, true, 50.0, 1.0)), 1);
    }

    #[test]
    fn probes_up_only_when_holding_calls_back() {
        let c = CapacityConfig::default();
        assert_eq!(next_limit(&c, &sig(16, 16, true, 0.0, 0.5)), 18);
        assert_eq!(next_limit(&c, &sig(16, 16, false, 0.0, 0.5)), 16);
        assert_eq!(next_limit(&c, &sig(16, 10, true, 0.0, 0.5)), 16);
        // A nearly full cache: the next admission would preempt.
        assert_eq!(next_limit(&c, &sig(16, 16, true, 0.0, 0.97)), 16);
        assert_eq!(next_limit(&c, &sig(256, 256, true, 0.0, 0.1)), 256);
    }

    #[test]
    fn disabled_is_the_fixed_limit() {
        let c = CapacityConfig {
            enabled: false,
            ..CapacityConfig::default()
        };
        assert_eq!(next_limit(&c, &sig(3, 40, true, 12.0, 0.9)), 256);
    }

    proptest! {
        #[test]
        fn stays_in_bounds_and_never_grows_while_the_engine_queues(
            limit in 0usize..300, max in 0usize..300, in_use in 0usize..400,
            demand: bool, waiting in -1.0f64..100.0, kv in 0.0f64..1.0
        ) {
            let c = CapacityConfig::default();
            let s = CapacitySignal { limit, max, in_use, demand, engine_waiting: waiting, kv_usage: kv };
            let n = next_limit(&c, &s);
            prop_assert!(n >= 1 && n <= max.max(1));
            if waiting > c.target_waiting {
                prop_assert!(n <= limit.clamp(1, max.max(1)));
            }
        }
    }
}
