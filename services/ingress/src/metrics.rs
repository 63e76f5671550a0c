//! The ingress's Prometheus metrics.

use prometheus_client::metrics::{
    counter::Counter, family::Family, gauge::Gauge, histogram::Histogram,
};
use prometheus_client::registry::Registry;

pub type Labels = Vec<(String, String)>;

pub use tether_telemetry::StaticLabel;

pub fn label(key: &str, value: &str) -> Labels {
    vec![(key.to_owned(), value.to_owned())]
}

/// The labels of `tether_ingress_calls`: the outcome, and the tenant when
/// API keys are configured.
pub fn call_labels(outcome: &str, tenant: Option<&str>) -> Labels {
    let mut l = label("outcome", outcome);
    if let Some(t) = tenant {
        l.push(("tenant".to_owned(), t.to_owned()));
    }
    l
}

#[derive(Clone, Debug)]
pub struct Metrics {
    /// Calls answered, by `outcome` (ok, client_error, error, engine_error,
    /// cancelled, refused) and, with API keys, `tenant`.
    pub calls: Family<Labels, Counter>,
    /// Decisions taken locally because the scheduler did not answer, by `reason`.
    pub fallbacks: Family<StaticLabel, Counter>,
    /// Scheduler decisions, by `reason`.
    pub decisions: Family<StaticLabel, Counter>,
    /// Calls in flight per engine, as this ingress counts them.
    pub in_flight: Family<Labels, Gauge>,
    /// Calls refused because an engine's queue was full.
    pub refused: Counter,
    /// Calls waiting for a slot, per preferred engine.
    pub queued: Family<Labels, Gauge>,
    /// Calls sent to an engine with no first token back yet (staging).
    pub staged: Family<Labels, Gauge>,
    /// Calls on an engine past their first token (decode balance).
    pub decoding: Family<Labels, Gauge>,
    /// The gateway's current limit per engine (capacity control).
    pub limit: Family<Labels, Gauge>,
    /// The engine's own waiting queue, as last scraped.
    pub engine_waiting: Family<Labels, Gauge>,
    /// Dispatched calls by `binding`: `preferred` (the scheduler's engine),
    /// `moved` (late binding sent it to another engine with room) or
    /// `retried` (another engine after a failed attempt).
    pub bindings: Family<StaticLabel, Counter>,
    /// Calls retried on another engine before any byte reached the client,
    /// by `reason` (connect, status, timeout, unhealthy).
    pub retries: Family<Labels, Counter>,
    /// Circuit-breaker ejections, by `engine`.
    pub ejections: Family<Labels, Counter>,
    /// Engines marked stalled (calls waited, token counters stood still), by `engine`.
    pub stalls: Family<Labels, Counter>,
    /// Engines ejected by the circuit breaker now (1) or admitted (0).
    pub ejected: Family<Labels, Gauge>,
    /// Fallback routes that kept the session on the engine that last served it.
    pub fallback_affinity: Counter,
    /// Calls refused (503) because the buffered request bodies reached their bound.
    pub body_busy: Counter,
    /// Route request round trip to the scheduler, seconds.
    pub route_seconds: Histogram,
    /// Arrival to first response byte from the engine, seconds.
    pub time_to_headers: Histogram,
    /// Arrival to dispatch (the wait at the gateway), by `engine`, seconds.
    pub queue_wait: Family<Labels, Histogram, fn() -> Histogram>,
    /// Arrival to the first token event of a streamed answer, seconds.
    pub time_to_first_token: Histogram,
    /// Arrival to the call's end, whatever its outcome, seconds.
    pub call_seconds: Histogram,
}

/// Buckets for waits and first tokens: 1 ms to 60 s.
fn latency_histogram() -> Histogram {
    Histogram::new([
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        let buckets = [
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
        ];
        Self {
            calls: Family::default(),
            fallbacks: Family::default(),
            decisions: Family::default(),
            in_flight: Family::default(),
            refused: Counter::default(),
            queued: Family::default(),
            staged: Family::default(),
            decoding: Family::default(),
            limit: Family::default(),
            engine_waiting: Family::default(),
            bindings: Family::default(),
            retries: Family::default(),
            ejections: Family::default(),
            stalls: Family::default(),
            ejected: Family::default(),
            fallback_affinity: Counter::default(),
            body_busy: Counter::default(),
            route_seconds: Histogram::new(buckets),
            time_to_headers: Histogram::new([
                0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0,
            ]),
            queue_wait: Family::new_with_constructor(latency_histogram),
            time_to_first_token: latency_histogram(),
            call_seconds: Histogram::new([
                0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ]),
        }
    }
}

impl Metrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "tether_ingress_calls",
            "Calls answered, by outcome",
            self.calls.clone(),
        );
        r.register(
            "tether_ingress_route_fallbacks",
            "Calls routed locally because the scheduler did not answer, by reason",
            self.fallbacks.clone(),
        );
        r.register(
            "tether_ingress_route_decisions",
            "Scheduler decisions, by reason",
            self.decisions.clone(),
        );
        r.register(
            "tether_ingress_engine_in_flight",
            "Calls in flight per engine (this ingress)",
            self.in_flight.clone(),
        );
        r.register(
            "tether_ingress_queue_refused",
            "Calls refused (429) because an engine's queue was full",
            self.refused.clone(),
        );
        r.register(
            "tether_ingress_queued",
            "Calls waiting for an engine slot",
            self.queued.clone(),
        );
        r.register(
            "tether_ingress_staged",
            "Streamed calls sent to an engine with no first token back yet",
            self.staged.clone(),
        );
        r.register(
            "tether_ingress_decoding",
            "Calls the gateway sent to an engine that are past their first token and not ended",
            self.decoding.clone(),
        );
        r.register(
            "tether_ingress_engine_limit",
            "The gateway's concurrency limit per engine (capacity control)",
            self.limit.clone(),
        );
        r.register(
            "tether_ingress_engine_waiting",
            "The engine's own waiting queue, as last scraped",
            self.engine_waiting.clone(),
        );
        r.register(
            "tether_ingress_bindings",
            "Dispatched calls by binding: preferred engine or moved (late binding)",
            self.bindings.clone(),
        );
        r.register(
            "tether_ingress_retries",
            "Calls retried on another engine before any byte reached the client, by reason",
            self.retries.clone(),
        );
        r.register(
            "tether_ingress_engine_ejections",
            "Circuit-breaker ejections of an engine after consecutive failed calls",
            self.ejections.clone(),
        );
        r.register(
            "tether_ingress_engine_stalls",
            "Engines marked stalled: calls waited on them while their token counters stood still",
            self.stalls.clone(),
        );
        r.register(
            "tether_ingress_engine_ejected",
            "Whether the circuit breaker holds an engine out now (1) or not (0)",
            self.ejected.clone(),
        );
        r.register(
            "tether_ingress_fallback_affinity",
            "Fallback routes that kept a session on the engine that last served it",
            self.fallback_affinity.clone(),
        );
        r.register(
            "tether_ingress_body_busy",
            "Calls refused (503) because buffered request bodies reached their bound",
            self.body_busy.clone(),
        );
        r.register(
            "tether_ingress_route_seconds",
            "Route request round trip to the scheduler",
            self.route_seconds.clone(),
        );
        r.register(
            "tether_ingress_time_to_headers_seconds",
            "Arrival to the engine's response headers",
            self.time_to_headers.clone(),
        );
        r.register(
            "tether_ingress_queue_wait_seconds",
            "Arrival to dispatch: the wait at the gateway, by the engine dispatched to",
            self.queue_wait.clone(),
        );
        r.register(
            "tether_ingress_time_to_first_token_seconds",
            "Arrival to the first token event of a streamed answer",
            self.time_to_first_token.clone(),
        );
        r.register(
            "tether_ingress_call_seconds",
            "Arrival to the end of the call, any outcome",
            self.call_seconds.clone(),
        );
    }
}
