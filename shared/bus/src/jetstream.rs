//! JetStream as Tether uses it: the durable stream of request events, each
//! shard's durable pull consumer, the store of shard snapshots, and
//! publishing with a deduplication id. `docs/protocol.md` ("Durability")
//! documents every name and setting used here.

use async_nats::HeaderMap;
use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
    object_store,
    stream::{self, DiscardPolicy, RetentionPolicy, StorageType},
};
use serde::Serialize;
use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::time::Duration;
use tether_protocol::{EventKind, RequestEvent, Subjects};
use tracing::Instrument;

use crate::{Bus, BusError, inject_context};

pub use async_nats::jetstream::consumer::PullConsumer as ShardConsumer;
pub use async_nats::jetstream::kv::{
    CreateErrorKind as LeaseCreateErrorKind, Store as LeaseStore,
    UpdateErrorKind as LeaseUpdateErrorKind,
};
pub use async_nats::jetstream::object_store::{GetErrorKind, ObjectStore};
pub use async_nats::jetstream::stream::Stream as JsStream;
pub use async_nats::jetstream::{Context, Message as JsMessage};

/// The deduplication header JetStream reads.
pub const MSG_ID_HEADER: &str = "Nats-Msg-Id";

#[derive(Debug, thiserror::Error)]
pub enum JetStreamError {
    #[error("events stream {name}: {error}")]
    Stream { name: String, error: String },
    #[error("consumer {name}: {error}")]
    Consumer { name: String, error: String },
    #[error("snapshot store {name}: {error}")]
    Store { name: String, error: String },
}

/// Replaces what a stream, consumer or bucket name may not contain.
fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `<PREFIX>_EVENTS`: the stream over `<prefix>.events.>`.
pub fn events_stream_name(subjects: &Subjects) -> String {
    format!("{}_EVENTS", sanitize(subjects.prefix()).to_uppercase())
}

/// `<prefix>-session-state-<shard>`: the shard's durable consumer.
pub fn shard_consumer_name(subjects: &Subjects, shard: u16) -> String {
    format!("{}-session-state-{shard}", sanitize(subjects.prefix()))
}

/// `<prefix>-snapshots`: the object store holding one snapshot per shard.
pub fn snapshot_bucket_name(subjects: &Subjects) -> String {
    format!("{}-snapshots", sanitize(subjects.prefix()))
}

/// The object name of a shard's snapshot.
pub fn snapshot_object_name(shard: u16) -> String {
    format!("shard-{shard}")
}

/// `<prefix>-leases`: the KV bucket of shard leases (one key per shard).
pub fn lease_bucket_name(subjects: &Subjects) -> String {
    format!("{}-leases", sanitize(subjects.prefix()))
}

/// The key of a shard's lease.
pub fn lease_key(shard: u16) -> String {
    format!("shard-{shard}")
}

/// The deduplication id of an event: its call id and kind. A call has one
/// `Dispatched` and one `Finished`, and call ids are unique per ingress.
pub fn event_msg_id(event: &RequestEvent) -> String {
    let kind = match event.kind {
        EventKind::Dispatched { .. } => 'd',
        EventKind::Finished(_) => 'f',
    };
    format!("{:016x}-{kind}", event.call_id)
}

/// What became of a publish that asked for JetStream's acknowledgement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stored {
    /// A stream stored it (or had it already: a repeated id).
    Yes,
    /// No stream captures the subject (no durable consumer is configured):
    /// the message still reached core subscribers, and there is nothing to
    /// wait for.
    NoStream,
}

/// Resolves when the stream acknowledged the message, or with why not
/// (timed out, connection lost, …): then publish it again, same id.
pub type StoredFuture = Pin<Box<dyn Future<Output = Result<Stored, BusError>> + Send>>;

/// A message ready to publish, and to publish again with the same id.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: bytes::Bytes,
    /// The producer span whose context the headers carry.
    span: tracing::Span,
}

/// How the events stream is kept.
#[derive(Clone, Copy, Debug)]
pub struct EventsStreamConfig {
    /// Events older than this are dropped (≥ the session idle TTL).
    pub max_age: Duration,
    /// Copies kept in a cluster.
    pub replicas: usize,
    /// Window in which a repeated `Nats-Msg-Id` is dropped.
    pub duplicate_window: Duration,
}

impl Bus {
    /// The JetStream context of this bus's connection.
    pub fn jetstream(&self) -> Context {
        jetstream::new(self.client.clone())
    }

    /// Publishes `msg` (core NATS, no acknowledgement) with the current
    /// trace context and a deduplication id that JetStream honours.
    pub async fn publish_with_id<T: Serialize>(
        &self,
        subject: String,
        msg: &T,
        id: &str,
    ) -> Result<(), BusError> {
        let payload = tether_protocol::encode(msg)?;
        let span = crate::typed::messaging_span("publish", "producer", &subject);
        let mut headers = HeaderMap::new();
        span.in_scope(|| inject_context(&mut headers));
        headers.insert(MSG_ID_HEADER, id);
        self.client
            .publish_with_headers(subject, headers, payload.into())
            .instrument(span)
            .await
            .map_err(|e| BusError::Publish(e.to_string()))
    }
}

impl Outgoing {
    /// Encodes `msg` once, with a producer span (a child of the current
    /// one) whose context travels in the headers, and the deduplication id
    /// `id`.
    pub fn new<T: Serialize>(subject: String, msg: &T, id: &str) -> Result<Self, BusError> {
        let payload = tether_protocol::encode(msg)?;
        let span = crate::typed::messaging_span("publish", "producer", &subject);
        let mut headers = HeaderMap::new();
        span.in_scope(|| inject_context(&mut headers));
        headers.insert(MSG_ID_HEADER, id);
        Ok(Self {
            subject,
            headers,
            payload: payload.into(),
            span,
        })
    }

    /// Publishes through JetStream: the future resolves once the stream has
    /// stored the message (or says no stream takes the subject). A publish
    /// that cannot even be sent resolves with its error at once.
    pub async fn publish_stored(&self, js: &Context) -> StoredFuture {
        let sent = js
            .publish_with_headers(
                self.subject.clone(),
                self.headers.clone(),
                self.payload.clone(),
            )
            .instrument(self.span.clone())
            .await;
        match sent {
            Ok(ack) => {
                let ack = ack.into_future();
                Box::pin(async move {
                    match ack.await {
                        Ok(_) => Ok(Stored::Yes),
                        Err(e)
                            if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound =>
                        {
                            Ok(Stored::NoStream)
                        }
                        Err(e) => Err(BusError::Publish(e.to_string())),
                    }
                })
            }
            Err(e) => {
                let err = BusError::Publish(e.to_string());
                Box::pin(async move { Err(err) })
            }
        }
    }
}

/// Creates the events stream, or updates its settings when it exists.
pub async fn ensure_events_stream(
    js: &Context,
    subjects: &Subjects,
    cfg: EventsStreamConfig,
) -> Result<stream::Stream, JetStreamError> {
    let name = events_stream_name(subjects);
    let err = |error: String| JetStreamError::Stream {
        name: name.clone(),
        error,
    };
    let config = stream::Config {
        name: name.clone(),
        description: Some(
            "Tether request events, replayed by session-state after a restart".into(),
        ),
        subjects: vec![format!("{}.events.>", subjects.prefix())],
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        storage: StorageType::File,
        max_age: cfg.max_age,
        num_replicas: cfg.replicas.max(1),
        duplicate_window: cfg.duplicate_window.min(cfg.max_age),
        ..Default::default()
    };
    js.create_or_update_stream(config)
        .await
        .map_err(|e| err(e.to_string()))?;
    js.get_stream(&name).await.map_err(|e| err(e.to_string()))
}

/// (Re)creates a shard's durable pull consumer so that it delivers the
/// shard's events after stream sequence `after` (all retained events for 0).
/// An existing consumer of that name is deleted first: its delivery point
/// cannot be moved, and the snapshot, not the consumer, says where to resume.
pub async fn shard_consumer(
    stream: &stream::Stream,
    subjects: &Subjects,
    shard: u16,
    after: u64,
    ack_wait: Duration,
    max_ack_pending: i64,
) -> Result<ShardConsumer, JetStreamError> {
    let name = shard_consumer_name(subjects, shard);
    // Not found is fine; any other failure shows in the create below.
    let _ = stream.delete_consumer(&name).await;
    let deliver_policy = if after == 0 {
        DeliverPolicy::All
    } else {
        DeliverPolicy::ByStartSequence {
            start_sequence: after + 1,
        }
    };
    stream
        .create_consumer(pull::Config {
            durable_name: Some(name.clone()),
            description: Some(format!("session-state, shard {shard}")),
            filter_subject: subjects.events(shard),
            deliver_policy,
            ack_policy: AckPolicy::All,
            ack_wait,
            max_ack_pending,
            ..Default::default()
        })
        .await
        .map_err(|e| JetStreamError::Consumer {
            name,
            error: e.to_string(),
        })
}

/// Opens the lease bucket (history 1; an entry not renewed within `ttl`
/// expires), creating it or updating its TTL.
pub async fn lease_store(
    js: &Context,
    subjects: &Subjects,
    ttl: Duration,
    replicas: usize,
) -> Result<LeaseStore, JetStreamError> {
    let bucket = lease_bucket_name(subjects);
    js.create_or_update_key_value(async_nats::jetstream::kv::Config {
        bucket: bucket.clone(),
        description: "Tether session-state shard leases".into(),
        history: 1,
        max_age: ttl,
        storage: StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    })
    .await
    .map_err(|e| JetStreamError::Store {
        name: bucket,
        error: e.to_string(),
    })
}

/// A shard consumer's lag: messages not yet delivered, and delivered but not
/// yet acknowledged (that is, not yet applied).
pub async fn shard_consumer_lag(
    js: &Context,
    subjects: &Subjects,
    shard: u16,
) -> Result<(u64, usize), JetStreamError> {
    let name = shard_consumer_name(subjects, shard);
    let err = |error: String| JetStreamError::Consumer {
        name: name.clone(),
        error,
    };
    let stream = js
        .get_stream(events_stream_name(subjects))
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut consumer: ShardConsumer = stream
        .get_consumer(&name)
        .await
        .map_err(|e| err(e.to_string()))?;
    let info = consumer.info().await.map_err(|e| err(e.to_string()))?;
    Ok((info.num_pending, info.num_ack_pending))
}

/// True when every shard consumer in `0..shards` has delivered and had
/// acknowledged (applied) everything in the stream; false while any lags
/// or cannot be read yet.
pub async fn shards_drained(js: &Context, subjects: &Subjects, shards: u16) -> bool {
    for shard in 0..shards {
        if !matches!(shard_consumer_lag(js, subjects, shard).await, Ok((0, 0))) {
            return false;
        }
    }
    true
}

/// Opens the snapshot store, creating it when missing.
pub async fn snapshot_store(
    js: &Context,
    subjects: &Subjects,
    replicas: usize,
) -> Result<ObjectStore, JetStreamError> {
    let bucket = snapshot_bucket_name(subjects);
    if let Ok(store) = js.get_object_store(&bucket).await {
        return Ok(store);
    }
    js.create_object_store(object_store::Config {
        bucket: bucket.clone(),
        description: Some("Tether session-state shard snapshots".into()),
        storage: StorageType::File,
        num_replicas: replicas.max(1),
        ..Default::default()
    })
    .await
    .map_err(|e| JetStreamError::Store {
        name: bucket,
        error: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_protocol::Finished;

    #[test]
    fn names_are_valid_jetstream_names() {
        let s = Subjects::new("acme.prod");
        assert_eq!(events_stream_name(&s), "ACME_PROD_EVENTS");
        assert_eq!(shard_consumer_name(&s, 3), "acme_prod-session-state-3");
        assert_eq!(snapshot_bucket_name(&s), "acme_prod-snapshots");
    }

    #[test]
    fn event_ids_differ_by_call_and_kind() {
        let mut e = RequestEvent {
            call_id: 0xabc,
            session_hash: 1,
            session_key: "s".into(),
            at_ms: 1,
            engine: "e".into(),
            kind: EventKind::Dispatched {
                inherited_cst: 0.0,
                level: 0,
            },
        };
        assert_eq!(event_msg_id(&e), "0000000000000abc-d");
        e.kind = EventKind::Finished(Finished {
            inherited_cst: 0.0,
            executed: 0.0,
            waited: 0.0,
            wall: 0.0,
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            outcome: tether_protocol::Outcome::Ok,
        });
        assert_eq!(event_msg_id(&e), "0000000000000abc-f");
    }
}
