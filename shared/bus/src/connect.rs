//! Connecting to NATS.

use prometheus_client::metrics::{counter::Counter, family::Family};
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Where and how to reach NATS.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// `nats://host:port` (comma-separated for a cluster).
    pub url: String,
    /// The client name the server shows (`nats server report connections`).
    pub name: String,
}

/// Counters fed by the client's connection events and by decoding, exposed
/// as Prometheus metrics by every service ([`BusStats::register`]).
#[derive(Debug, Clone, Default)]
pub struct BusStats {
    /// SlowConsumer events: a subscription fell behind and the client dropped
    /// messages.
    pub slow_consumer: Counter,
    pub disconnects: Counter,
    pub connects: Counter,
    pub errors: Counter,
    /// Messages that did not decode, by subject kind (`events`, `state`, ...).
    pub decode_errors: Family<Vec<(String, String)>, Counter>,
}

impl BusStats {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tether_bus_slow_consumer",
            "NATS slow-consumer events (messages dropped by the client)",
            self.slow_consumer.clone(),
        );
        registry.register(
            "tether_bus_disconnects",
            "NATS disconnections",
            self.disconnects.clone(),
        );
        registry.register(
            "tether_bus_connects",
            "NATS (re)connections",
            self.connects.clone(),
        );
        registry.register(
            "tether_bus_errors",
            "NATS client and server errors",
            self.errors.clone(),
        );
        registry.register(
            "tether_bus_decode_errors",
            "Bus messages that failed to decode and were dropped",
            self.decode_errors.clone(),
        );
    }

    pub fn count_decode_error(&self, kind: &str) {
        self.decode_errors
            .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
            .inc();
    }
}

/// Connects to NATS. Returns at once: when the server is not up yet the client
/// keeps retrying in the background (`retry_on_initial_connect`), publishes are
/// buffered and requests fail or time out, which callers treat as "bus down".
pub async fn connect(
    config: &BusConfig,
) -> Result<(async_nats::Client, BusStats), async_nats::ConnectError> {
    let stats = BusStats::default();
    let events = stats.clone();
    let client = async_nats::ConnectOptions::new()
        .name(&config.name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| {
            // 0, 50 ms, 100 ms, ... capped at 1 s: quick to come back after a blip.
            Duration::from_millis((attempts as u64 * 50).min(1000))
        })
        .event_callback(move |event| {
            let stats = events.clone();
            async move {
                use async_nats::Event;
                match event {
                    Event::SlowConsumer(sid) => {
                        stats.slow_consumer.inc();
                        tracing::warn!(sid, "NATS subscription fell behind: messages dropped");
                    }
                    Event::Disconnected => {
                        stats.disconnects.inc();
                        tracing::warn!("NATS disconnected");
                    }
                    Event::Connected => {
                        stats.connects.inc();
                        tracing::info!("NATS connected");
                    }
                    Event::ServerError(err) => {
                        stats.errors.inc();
                        tracing::warn!(%err, "NATS server error");
                    }
                    Event::ClientError(err) => {
                        stats.errors.inc();
                        tracing::warn!(%err, "NATS client error");
                    }
                    other => tracing::info!(event = %other, "NATS event"),
                }
            }
        })
        .connect(config.url.as_str())
        .await?;
    Ok((client, stats))
}
