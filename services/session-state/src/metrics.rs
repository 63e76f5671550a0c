//! The service's Prometheus metrics.

use prometheus_client::metrics::{counter::Counter, gauge::Gauge};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Default)]
pub struct Metrics {
    pub events: Counter,
    /// Events published on a shard subject that the session's hash does not
    /// belong to: a publisher with another shard count. Dropped.
    pub misrouted: Counter,
    pub sessions: Gauge,
    pub deltas: Counter,
    pub delta_records: Counter,
    pub evicted: Counter,
    /// New sessions refused at the session cap because every held session
    /// was active within the idle TTL (or had a call in flight).
    pub refused: Counter,
    pub snapshots: Counter,
    pub queries: Counter,
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "tether_session_events",
            "Request events applied",
            self.events.clone(),
        );
        r.register(
            "tether_session_misrouted_events",
            "Events dropped because their session belongs to another shard",
            self.misrouted.clone(),
        );
        r.register(
            "tether_session_sessions",
            "Sessions held by this process",
            self.sessions.clone(),
        );
        r.register(
            "tether_session_deltas",
            "State deltas published",
            self.deltas.clone(),
        );
        r.register(
            "tether_session_delta_records",
            "Session records published in deltas",
            self.delta_records.clone(),
        );
        r.register(
            "tether_session_evicted",
            "Sessions evicted (idle, or idle and over the bound)",
            self.evicted.clone(),
        );
        r.register(
            "tether_session_refused",
            "New sessions refused at the cap because every held session was active within the idle TTL",
            self.refused.clone(),
        );
        r.register(
            "tether_session_snapshot_pages",
            "Snapshot pages served",
            self.snapshots.clone(),
        );
        r.register(
            "tether_session_queries",
            "Session queries served",
            self.queries.clone(),
        );
    }
}
