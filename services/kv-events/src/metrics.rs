//! The relay's Prometheus metrics, each labelled by `engine`.

use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
use prometheus_client::registry::Registry;

pub type Labels = Vec<(String, String)>;

#[derive(Clone, Debug, Default)]
pub struct Metrics {
    /// Engine batches relayed (live or replayed).
    pub batches: Family<Labels, Counter>,
    /// Blocks relayed, by `kind`: `stored`, `removed`; `cleared` counts events.
    pub blocks: Family<Labels, Counter>,
    /// Sequence gaps seen on an engine's stream.
    pub gaps: Family<Labels, Counter>,
    /// Replay requests, by `outcome`: `ok` or `failed`.
    pub replays: Family<Labels, Counter>,
    /// Resets published, by `reason`: `gap` (not replayable), `restart`
    /// (the sequence went back), `disconnect`, `undecodable`.
    pub resets: Family<Labels, Counter>,
    /// Messages that did not decode (dropped; a reset follows).
    pub decode_errors: Family<Labels, Counter>,
    /// Relayed batches NATS did not take.
    pub publish_errors: Family<Labels, Counter>,
    /// 1 while the engine's publisher is connected.
    pub connected: Family<Labels, Gauge>,
}

pub fn engine(name: &str) -> Labels {
    vec![("engine".into(), name.into())]
}

pub fn engine_and(name: &str, key: &str, value: &str) -> Labels {
    vec![("engine".into(), name.into()), (key.into(), value.into())]
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "tether_kv_events_batches",
            "Engine KV event batches relayed",
            self.batches.clone(),
        );
        r.register(
            "tether_kv_events_blocks",
            "Blocks relayed, by kind (stored, removed; cleared counts events)",
            self.blocks.clone(),
        );
        r.register(
            "tether_kv_events_gaps",
            "Sequence gaps seen on an engine's event stream",
            self.gaps.clone(),
        );
        r.register(
            "tether_kv_events_replays",
            "Replay requests, by outcome",
            self.replays.clone(),
        );
        r.register(
            "tether_kv_events_resets",
            "Resets published for an engine, by reason",
            self.resets.clone(),
        );
        r.register(
            "tether_kv_events_decode_errors",
            "Engine messages that did not decode",
            self.decode_errors.clone(),
        );
        r.register(
            "tether_kv_events_publish_errors",
            "Relayed batches NATS did not take",
            self.publish_errors.clone(),
        );
        r.register(
            "tether_kv_events_connected",
            "1 while the engine's event publisher is connected",
            self.connected.clone(),
        );
    }
}
