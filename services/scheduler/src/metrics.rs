//! The scheduler's Prometheus metrics.

use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use prometheus_client::registry::Registry;

pub type Labels = Vec<(String, String)>;

pub use tether_telemetry::StaticLabel;

/// Event to replica: how old the newest event behind a state delta is when
/// the delta reaches this scheduler, seconds (1 ms to 5 s).
#[derive(Clone, Debug)]
pub struct DeltaLag(pub Histogram);

impl Default for DeltaLag {
    fn default() -> Self {
        Self(Histogram::new([
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
        ]))
    }
}

#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub decisions: Family<StaticLabel, Counter>,
    pub delta_lag: DeltaLag,
    pub no_engine: Counter,
    pub deltas: Counter,
    pub resyncs: Counter,
    pub resync_failures: Counter,
    pub sessions: Gauge,
    pub in_flight: Family<Labels, Gauge>,
    pub healthy: Family<Labels, Gauge>,
    pub expired_calls: Counter,
    /// Decisions for sessions that had an affinity engine, by `affinity`:
    /// `kept` (placed there) or `moved` (placed elsewhere); `none` without.
    pub affinity: Family<StaticLabel, Counter>,
    /// Decisions by whether the chosen engine held the best prefix match
    /// available: `prefix` = `best`, `shorter` (a longer match elsewhere,
    /// e.g. for load), or `none` (no engine held any of the prompt).
    pub prefix: Family<StaticLabel, Counter>,
    /// KV event batches applied to the exact index, by `outcome`: `ok`,
    /// `resynced` (a gap or new epoch purged the engine first), `unknown`
    /// (an engine not in the fleet).
    pub kv_batches: Family<Labels, Counter>,
    /// KV snapshots fetched from the relay, by `outcome`: `loaded`, `stale`
    /// (batches past it were applied already), `failed` (retried).
    pub kv_snapshots: Family<Labels, Counter>,
    /// Blocks in the exact index.
    pub kv_blocks: Gauge,
    /// Engines whose KV events flow (the exact index answers for them).
    pub kv_engines: Gauge,
    /// 1 for the prefix index placing calls, by `source`: `exact` or `approximate`.
    pub prefix_source: Family<Labels, Gauge>,
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "tether_scheduler_delta_lag_seconds",
            "Age of the newest event behind a state delta when the delta arrives",
            self.delta_lag.0.clone(),
        );
        r.register(
            "tether_scheduler_kv_batches",
            "KV event batches applied to the exact index, by outcome",
            self.kv_batches.clone(),
        );
        r.register(
            "tether_scheduler_kv_snapshots",
            "KV snapshots fetched from the relay, by outcome",
            self.kv_snapshots.clone(),
        );
        r.register(
            "tether_scheduler_kv_index_blocks",
            "Blocks in the exact prefix index",
            self.kv_blocks.clone(),
        );
        r.register(
            "tether_scheduler_kv_index_engines",
            "Engines whose KV cache events flow",
            self.kv_engines.clone(),
        );
        r.register(
            "tether_scheduler_prefix_source",
            "The prefix index placing calls (1), by source: exact or approximate",
            self.prefix_source.clone(),
        );
        r.register(
            "tether_scheduler_decisions",
            "Route decisions, by reason",
            self.decisions.clone(),
        );
        r.register(
            "tether_scheduler_no_engine",
            "Route requests no engine could take",
            self.no_engine.clone(),
        );
        r.register(
            "tether_scheduler_deltas",
            "State deltas applied",
            self.deltas.clone(),
        );
        r.register(
            "tether_scheduler_resyncs",
            "Shard resynchronisations started",
            self.resyncs.clone(),
        );
        r.register(
            "tether_scheduler_resync_failures",
            "Shard resynchronisations that failed (retried)",
            self.resync_failures.clone(),
        );
        r.register(
            "tether_scheduler_sessions",
            "Sessions in the replica",
            self.sessions.clone(),
        );
        r.register(
            "tether_scheduler_engine_in_flight",
            "Calls in flight per engine",
            self.in_flight.clone(),
        );
        r.register(
            "tether_scheduler_engine_healthy",
            "1 when the engine is healthy",
            self.healthy.clone(),
        );
        r.register(
            "tether_scheduler_affinity",
            "Decisions by what happened to the session's affinity: kept, moved, none",
            self.affinity.clone(),
        );
        r.register(
            "tether_scheduler_prefix",
            "Decisions by the chosen engine's prefix match: best, shorter (a longer one elsewhere), none",
            self.prefix.clone(),
        );
        r.register(
            "tether_scheduler_expired_calls",
            "Calls dropped from the load count after the call timeout",
            self.expired_calls.clone(),
        );
    }
}

pub fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_owned(), value.to_owned())]
}
