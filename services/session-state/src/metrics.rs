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
    /// Stream deliveries at or below the applied sequence: skipped.
    pub duplicates: Counter,
    pub snapshots_written: Counter,
    pub snapshot_failures: Counter,
    /// Shards started from a stored snapshot.
    pub snapshots_loaded: Counter,
    /// Shard consumers recreated after a reconnect or a stream error.
    pub consumer_restarts: Counter,
    /// Shards started from a snapshot older than the stream's first
    /// retained event: events in between may be lost.
    pub replay_gaps: Counter,
    /// Shards whose lease this process holds (lease mode).
    pub leases: Gauge,
    pub lease_losses: Counter,
    /// Deliveries dropped because the shard's lease had lapsed.
    pub fenced: Counter,
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
            "tether_session_duplicate_events",
            "Events-stream deliveries skipped because they were already applied",
            self.duplicates.clone(),
        );
        r.register(
            "tether_session_snapshots_written",
            "Shard snapshots written to the snapshot store",
            self.snapshots_written.clone(),
        );
        r.register(
            "tether_session_snapshot_failures",
            "Shard snapshot writes that failed",
            self.snapshot_failures.clone(),
        );
        r.register(
            "tether_session_snapshots_loaded",
            "Shards started from a stored snapshot",
            self.snapshots_loaded.clone(),
        );
        r.register(
            "tether_session_consumer_restarts",
            "Shard consumers recreated after a reconnect or a stream error",
            self.consumer_restarts.clone(),
        );
        r.register(
            "tether_session_replay_gaps",
            "Shards started from a snapshot older than the events stream's first retained event",
            self.replay_gaps.clone(),
        );
        r.register(
            "tether_session_leases",
            "Shards whose lease this process holds (lease mode)",
            self.leases.clone(),
        );
        r.register(
            "tether_session_lease_losses",
            "Shard leases lost (not renewed in time, or taken by another owner)",
            self.lease_losses.clone(),
        );
        r.register(
            "tether_session_fenced_events",
            "Deliveries dropped because the shard's lease had lapsed",
            self.fenced.clone(),
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
