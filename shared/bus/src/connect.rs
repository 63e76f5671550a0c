//! Connecting to NATS.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};
use std::time::Duration;

/// Where and how to reach NATS.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// `nats://host:port` (comma-separated for a cluster).
    pub url: String,
    /// The client name the server shows (`nats server report connections`).
    pub name: String,
}

/// Counters fed by the client's connection events. Exposed as metrics by
/// each service.
#[derive(Debug, Default)]
pub struct BusStats {
    /// Messages dropped because a subscription fell behind (SlowConsumer events).
    pub slow_consumer: AtomicU64,
    pub disconnects: AtomicU64,
    pub reconnects: AtomicU64,
    pub errors: AtomicU64,
}

impl BusStats {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// Connects to NATS. Returns at once: when the server is not up yet the client
/// keeps retrying in the background (`retry_on_initial_connect`), publishes are
/// buffered and requests fail or time out, which callers treat as "bus down".
pub async fn connect(config: &BusConfig) -> Result<(async_nats::Client, Arc<BusStats>), async_nats::ConnectError> {
    let stats = Arc::new(BusStats::default());
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
                        stats.slow_consumer.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(sid, "NATS subscription fell behind: messages dropped");
                    }
                    Event::Disconnected => {
                        stats.disconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("NATS disconnected");
                    }
                    Event::Connected => {
                        stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        tracing::info!("NATS connected");
                    }
                    Event::ServerError(err) => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%err, "NATS server error");
                    }
                    Event::ClientError(err) => {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
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
