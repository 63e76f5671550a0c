//! Capacity control: how many calls the gateway lets run on an engine at
//! once, learned from the engine's own signals, so that calls wait at the
//! gateway (where Tether orders them and binds them late) instead of in the
//! engine's waiting queue — without idling the engine.
//!
//! The rule, applied on every scrape of the engine's metrics (vLLM
//! `num_requests_running`, `num_requests_waiting`, `kv_cache_usage_perc`;
//! SGLang's equivalents):
//!
//! - **Congested** when the engine queues more than `target_waiting` calls
//!   on two scrapes in a row (a queue that persists; a call sent a moment
//!   ago waits for the engine's next step, and that is no congestion). Then
//!   the engine runs all it can: the *peak* — the most it has been seen
//!   running while congested — is what it holds, and the limit becomes
//!   `⌈(peak + target_waiting) / replicas⌉`. An engine that is full of seats
//!   (vLLM `max_num_seqs`) or of KV blocks thus gets exactly its capacity,
//!   plus one call staged for its next step.
//! - **Probe up** when the gateway holds calls back (some wait, and the
//!   engine has all its limit in use), the engine is not congested and its
//!   KV cache is below `kv_high`: the limit grows by `max(1, limit / 8)`.
//! - Otherwise keep the limit. It stays within `[1, max]`, `max` being the
//!   engine's `max_concurrency` share (the fleet file).
//!
//! Why the peak and not the running count of the moment: an engine also
//! queues for a moment when its step's token budget is taken by long
//! prefills (it is busy computing, not full); cutting the limit to the few
//! it runs then would starve its decode batch for seconds. The peak only
//! grows, so a transient queue never lowers the limit below what the engine
//! has shown it can run. An engine whose capacity shrinks (restarted with a
//! smaller configuration) is handled by its queue: the limit never grows
//! while it is congested.

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
    /// The engine's running requests, as it reports them.
    pub engine_running: f64,
    /// Ingress replicas sharing the engine.
    pub replicas: usize,
    /// The engine's KV-cache usage, 0..=1.
    pub kv_usage: f64,
}

/// The next limit and peak under the rule in the module docs. `peak` is the
/// most the engine has been seen running while congested (0 at first).
pub fn next_limit(cfg: &CapacityConfig, s: &CapacitySignal, peak: usize) -> (usize, usize) {
    let max = s.max.max(1);
    if !cfg.enabled {
        return (max, peak);
    }
    let limit = s.limit.clamp(1, max);
    let finite = |v: f64| if v.is_finite() { v.max(0.0) } else { 0.0 };
    let (waiting, running) = (finite(s.engine_waiting), finite(s.engine_running));
    let target = cfg.target_waiting.max(0.0);
    if waiting > target {
        let peak = peak.max(running.round() as usize);
        let share = ((peak as f64 + target) / s.replicas.max(1) as f64).ceil() as usize;
        return (share.clamp(1, max), peak);
    }
    if s.demand && s.in_use >= limit && s.kv_usage < cfg.kv_high {
        return ((limit + (limit / 8).max(1)).min(max), peak);
    }
    (limit, peak)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sig(
        limit: usize,
        in_use: usize,
        demand: bool,
        waiting: f64,
        running: f64,
    ) -> CapacitySignal {
        CapacitySignal {
            limit,
            max: 256,
            in_use,
            demand,
            engine_waiting: waiting,
            engine_running: running,
            kv_usage: 0.5,
            replicas: 1,
        }
    }

    #[test]
    fn a_full_engine_gets_its_capacity_plus_one_staged() {
        let c = CapacityConfig::default();
        // 40 sent, the engine runs 28 and queues 12: it holds 28.
        assert_eq!(next_limit(&c, &sig(256, 40, true, 12.0, 28.0), 0), (29, 28));
        // Two ingress replicas share it.
        let two = CapacitySignal {
            replicas: 2,
            ..sig(256, 40, true, 12.0, 28.0)
        };
        assert_eq!(next_limit(&c, &two, 0).0, 15);
    }

    #[test]
    fn a_transient_queue_never_cuts_below_the_peak() {
        let c = CapacityConfig::default();
        // Long prefills fill a step: 2 run, 3 wait — the engine has run 28.
        assert_eq!(next_limit(&c, &sig(29, 5, true, 3.0, 2.0), 28), (29, 28));
    }

    #[test]
    fn probes_up_only_when_holding_calls_back() {
        let c = CapacityConfig::default();
        assert_eq!(next_limit(&c, &sig(16, 16, true, 0.0, 16.0), 15).0, 18);
        assert_eq!(next_limit(&c, &sig(16, 16, false, 0.0, 16.0), 15).0, 16);
        assert_eq!(next_limit(&c, &sig(16, 10, true, 0.0, 10.0), 15).0, 16);
        // A nearly full cache: the next admission would preempt.
        let full = CapacitySignal {
            kv_usage: 0.97,
            ..sig(16, 16, true, 0.0, 16.0)
        };
        assert_eq!(next_limit(&c, &full, 15).0, 16);
        assert_eq!(next_limit(&c, &sig(256, 256, true, 0.0, 256.0), 0).0, 256);
    }

    #[test]
    fn disabled_is_the_fixed_limit() {
        let c = CapacityConfig {
            enabled: false,
            ..CapacityConfig::default()
        };
        assert_eq!(next_limit(&c, &sig(3, 40, true, 12.0, 28.0), 0).0, 256);
    }

    proptest! {
        #[test]
        fn stays_in_bounds_and_never_grows_past_the_peak_while_the_engine_queues(
            limit in 0usize..300, max in 0usize..300, in_use in 0usize..400,
            demand: bool, waiting in -1.0f64..100.0, running in -1.0f64..300.0,
            kv in 0.0f64..1.0, peak in 0usize..300,
        ) {
            let c = CapacityConfig::default();
            let s = CapacitySignal { limit, max, in_use, demand, engine_waiting: waiting,
                engine_running: running, kv_usage: kv, replicas: 1 };
            let (n, p) = next_limit(&c, &s, peak);
            prop_assert!(n >= 1 && n <= max.max(1));
            prop_assert!(p >= peak);
            if waiting > c.target_waiting {
                prop_assert!(n <= (p + 1).max(1));
            }
        }
    }
}
