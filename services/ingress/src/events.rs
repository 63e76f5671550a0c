//! Lifecycle events leave the request path through a bounded buffer; one
//! task publishes them in order, each inside its call's span so that the
//! trace context travels with it. When the buffer is full (NATS unreachable
//! for long), new events are dropped and counted — the call itself is never
//! held up by the bus.
//!
//! With acknowledgements on (`--event-acks`, the default) an event counts as
//! sent only once the events stream has stored it: up to `window` events
//! wait for their acknowledgement at once, and one that is not acknowledged
//! (timed out, connection lost, a cluster electing a new stream leader) is
//! published again with the same deduplication id, so the stream keeps it
//! once. Without a stream (session-state run with `--durable false`) the
//! answer "no stream" ends the wait — core subscribers already have it —
//! until a stream has once stored an event: from then on it means the
//! stream is away for a moment, and the event is sent again.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesOrdered;

use prometheus_client::metrics::counter::Counter;
use tether_bus::Bus;
use tether_bus::jetstream::{Context, Outgoing, Stored, event_msg_id};
use tether_protocol::{RequestEvent, shard_of};
use tether_telemetry::Shutdown;
use tokio::sync::mpsc;
use tracing::Instrument;

/// How events are published.
#[derive(Clone, Copy, Debug)]
pub struct PublishConfig {
    /// Events buffered before new ones are dropped.
    pub buffer: usize,
    /// Wait for the events stream's acknowledgement and publish again
    /// without one; false: core publishes, never repeated.
    pub acks: bool,
    /// Events awaiting their acknowledgement at once.
    pub window: usize,
    /// How long an acknowledgement is awaited before the event is sent again.
    pub ack_timeout: Duration,
}

/// The publisher's counters.
#[derive(Clone, Default)]
pub struct EventCounters {
    /// Dropped: the buffer was full, or shutdown came before an acknowledgement.
    pub dropped: Counter,
    /// Published again because no acknowledgement came.
    pub retried: Counter,
}

#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<(RequestEvent, tracing::Span)>,
    pub counters: EventCounters,
}

impl EventSink {
    pub fn emit(&self, event: RequestEvent, span: tracing::Span) {
        if self.tx.try_send((event, span)).is_err() {
            self.counters.dropped.inc();
        }
    }
}

/// How long shutdown waits for the acknowledgements still owed.
const DRAIN: Duration = Duration::from_secs(5);
/// The pause before the n-th repeat of one event: 50 ms, doubling, at most 1 s.
fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(5)).min(1000))
}

/// Starts the publisher; it drains what is buffered after shutdown fires.
pub fn spawn_publisher(
    bus: Bus,
    shards: u16,
    config: PublishConfig,
    shutdown: Shutdown,
) -> (EventSink, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<(RequestEvent, tracing::Span)>(config.buffer.max(1));
    let counters = EventCounters::default();
    let sink = EventSink {
        tx,
        counters: counters.clone(),
    };
    let handle = if config.acks {
        let mut js = bus.jetstream();
        js.set_timeout(config.ack_timeout);
        let publisher = Acked {
            bus,
            js,
            shards,
            window: config.window.max(1),
            counters,
            pending: FuturesOrdered::new(),
            seen_stream: false,
        };
        tokio::spawn(publisher.run(rx, shutdown))
    } else {
        tokio::spawn(core_publisher(bus, shards, rx, shutdown))
    };
    (sink, handle)
}

async fn core_publisher(
    bus: Bus,
    shards: u16,
    mut rx: mpsc::Receiver<(RequestEvent, tracing::Span)>,
    shutdown: Shutdown,
) {
    loop {
        let next = tokio::select! {
            biased;
            next = rx.recv() => next,
            _ = shutdown.cancelled() => break,
        };
        let Some((event, span)) = next else { return };
        publish_core(&bus, shards, event, span).await;
    }
    // Shutting down: publish what is already buffered, then flush.
    rx.close();
    while let Some((event, span)) = rx.recv().await {
        publish_core(&bus, shards, event, span).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), bus.client.flush()).await;
}

async fn publish_core(bus: &Bus, shards: u16, event: RequestEvent, span: tracing::Span) {
    let subject = bus.subjects.events(shard_of(event.session_hash, shards));
    // Core publish (no acknowledgement wait); the events stream captures it,
    // and the id lets JetStream drop a repeat (see docs/protocol.md).
    let id = event_msg_id(&event);
    if let Err(err) = bus
        .publish_with_id(subject, &event, &id)
        .instrument(span)
        .await
    {
        tracing::warn!(%err, call_id = event.call_id, "event publish failed");
    }
}

/// An event sent, and what became of it.
struct Settled {
    msg: Outgoing,
    call_id: u64,
    attempt: u32,
    outcome: Result<Stored, tether_bus::BusError>,
}

type Waiting = Pin<Box<dyn Future<Output = Settled> + Send>>;

/// Publishes `msg` (after `pause`) and waits for its acknowledgement.
fn publish_and_wait(
    js: Context,
    msg: Outgoing,
    call_id: u64,
    attempt: u32,
    pause: Duration,
) -> Waiting {
    Box::pin(async move {
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
        let outcome = msg.publish_stored(&js).await.await;
        Settled {
            msg,
            call_id,
            attempt,
            outcome,
        }
    })
}

/// The acknowledged publisher: events go out in order, at most `window`
/// await their acknowledgement at once (their timeouts run together), and
/// they are settled oldest first; one to send again goes back to the front.
struct Acked {
    bus: Bus,
    js: Context,
    shards: u16,
    window: usize,
    counters: EventCounters,
    pending: FuturesOrdered<Waiting>,
    /// A stream has stored an event: from then on "no stream" means the
    /// stream is unavailable for a moment (a cluster electing its leader),
    /// not that there is none, and the event is sent again.
    seen_stream: bool,
}

impl Acked {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<(RequestEvent, tracing::Span)>,
        shutdown: Shutdown,
    ) {
        loop {
            let room = self.pending.len() < self.window;
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(settled) = self.pending.next(), if !self.pending.is_empty() => self.settle(settled),
                next = rx.recv(), if room => {
                    let Some((event, span)) = next else { break };
                    self.send(event, span).await;
                }
            }
        }
        // Shutting down: send what is buffered, then wait (bounded) for what
        // is owed; whatever is still unacknowledged then is counted dropped.
        rx.close();
        let drain = async {
            while let Some((event, span)) = rx.recv().await {
                while self.pending.len() >= self.window {
                    match self.pending.next().await {
                        Some(settled) => self.settle(settled),
                        None => break,
                    }
                }
                self.send(event, span).await;
            }
            while let Some(settled) = self.pending.next().await {
                self.settle(settled);
            }
        };
        if tokio::time::timeout(DRAIN, drain).await.is_err() {
            self.counters.dropped.inc_by(self.pending.len() as u64);
            tracing::warn!(
                unacknowledged = self.pending.len(),
                "shutdown: events not acknowledged by the stream in time"
            );
        }
        while rx.try_recv().is_ok() {
            self.counters.dropped.inc();
        }
    }

    async fn send(&mut self, event: RequestEvent, span: tracing::Span) {
        let subject = self
            .bus
            .subjects
            .events(shard_of(event.session_hash, self.shards));
        let id = event_msg_id(&event);
        let msg = match span.in_scope(|| Outgoing::new(subject, &event, &id)) {
            Ok(msg) => msg,
            Err(err) => {
                self.counters.dropped.inc();
                tracing::warn!(%err, call_id = event.call_id, "event not encodable; dropped");
                return;
            }
        };
        self.pending.push_back(publish_and_wait(
            self.js.clone(),
            msg,
            event.call_id,
            0,
            Duration::ZERO,
        ));
    }

    /// Ends an event's wait: done when stored (or when there is no stream
    /// at all), otherwise sent again after a pause that grows with its
    /// attempts, ahead of the others.
    fn settle(&mut self, settled: Settled) {
        let err = match settled.outcome {
            Ok(Stored::Yes) => {
                self.seen_stream = true;
                return;
            }
            Ok(Stored::NoStream) if !self.seen_stream => return,
            Ok(Stored::NoStream) => "no stream answered".to_owned(),
            Err(err) => err.to_string(),
        };
        if settled.attempt == 0 {
            tracing::warn!(%err, call_id = settled.call_id, "event not acknowledged; publishing it again");
        }
        self.counters.retried.inc();
        self.pending.push_front(publish_and_wait(
            self.js.clone(),
            settled.msg,
            settled.call_id,
            settled.attempt.saturating_add(1),
            backoff(settled.attempt),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_doubles_to_a_second() {
        assert_eq!(backoff(0), Duration::from_millis(50));
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(4), Duration::from_millis(800));
        assert_eq!(backoff(5), Duration::from_secs(1));
        assert_eq!(backoff(u32::MAX), Duration::from_secs(1));
    }
}
