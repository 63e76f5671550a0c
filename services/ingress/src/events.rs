//! Lifecycle events leave the request path through a bounded buffer; one
//! task publishes them in order, each inside its call's span so that the
//! trace context travels with it. When the buffer is full (NATS unreachable
//! for long), new events are dropped and counted — the call itself is never
//! held up by the bus.

use prometheus_client::metrics::counter::Counter;
use tether_bus::Bus;
use tether_protocol::{RequestEvent, shard_of};
use tether_telemetry::Shutdown;
use tokio::sync::mpsc;
use tracing::Instrument;

#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<(RequestEvent, tracing::Span)>,
    pub dropped: Counter,
}

impl EventSink {
    pub fn emit(&self, event: RequestEvent, span: tracing::Span) {
        if self.tx.try_send((event, span)).is_err() {
            self.dropped.inc();
        }
    }
}

/// Starts the publisher; it drains what is buffered after shutdown fires.
pub fn spawn_publisher(
    bus: Bus,
    shards: u16,
    capacity: usize,
    shutdown: Shutdown,
) -> (EventSink, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<(RequestEvent, tracing::Span)>(capacity.max(1));
    let sink = EventSink {
        tx,
        dropped: Counter::default(),
    };
    let handle = tokio::spawn(async move {
        loop {
            let next = tokio::select! {
                biased;
                next = rx.recv() => next,
                _ = shutdown.cancelled() => break,
            };
            let Some((event, span)) = next else { return };
            publish(&bus, shards, event, span).await;
        }
        // Shutting down: publish what is already buffered, then flush.
        rx.close();
        while let Some((event, span)) = rx.recv().await {
            publish(&bus, shards, event, span).await;
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), bus.client.flush()).await;
    });
    (sink, handle)
}

async fn publish(bus: &Bus, shards: u16, event: RequestEvent, span: tracing::Span) {
    let subject = bus.subjects.events(shard_of(event.session_hash, shards));
    // Core publish (no acknowledgement wait); the events stream captures it,
    // and the id lets JetStream drop a repeat (see docs/protocol.md).
    let id = tether_bus::jetstream::event_msg_id(&event);
    if let Err(err) = bus
        .publish_with_id(subject, &event, &id)
        .instrument(span)
        .await
    {
        tracing::warn!(%err, call_id = event.call_id, "event publish failed");
    }
}
