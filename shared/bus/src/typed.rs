//! Typed messaging over the protocol codec, with trace context attached.

use async_nats::{HeaderMap, Message, client::RequestErrorKind};
use serde::{Serialize, de::DeserializeOwned};
use std::time::Duration;
use tether_protocol::{CodecError, Subjects};

use crate::{BusStats, inject_context};
use tracing::Instrument;

/// A span for sending on `subject`, named and attributed after OpenTelemetry's
/// messaging conventions (`<operation> <destination>`, `messaging.*`) — only
/// inside a trace: housekeeping sends (delta ticks, snapshots) start none.
pub(crate) fn messaging_span(
    operation: &'static str,
    kind: &'static str,
    subject: &str,
) -> tracing::Span {
    if tracing::Span::current().is_none() {
        return tracing::Span::none();
    }
    tracing::info_span!(
        "nats.send",
        otel.name = %format_args!("{operation} {subject}"),
        otel.kind = kind,
        messaging.system = "nats",
        messaging.operation.type = "send",
        messaging.operation.name = operation,
        messaging.destination.name = subject,
    )
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error(transparent)]
    Codec(#[from] CodecError),
    #[error("not connected to NATS")]
    Disconnected,
    #[error("no responders on {0}")]
    NoResponders(String),
    #[error("request on {0} timed out")]
    TimedOut(String),
    #[error("publish failed: {0}")]
    Publish(String),
    #[error("request failed: {0}")]
    Request(String),
    #[error("subscribe failed: {0}")]
    Subscribe(String),
}

/// A NATS client, the subject names and the bus counters, shared by a
/// service's tasks (cheap to clone).
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub subjects: Subjects,
    pub stats: BusStats,
}

impl Bus {
    pub fn new(client: async_nats::Client, subjects: Subjects, stats: BusStats) -> Self {
        Self {
            client,
            subjects,
            stats,
        }
    }

    /// Connects (retrying in the background, see [`crate::connect()`]).
    pub async fn connect(config: &crate::BusConfig, subjects: Subjects) -> Result<Self, BusError> {
        let (client, stats) = crate::connect(config)
            .await
            .map_err(|e| BusError::Request(format!("connect: {e}")))?;
        Ok(Self::new(client, subjects, stats))
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    fn traced_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        inject_context(&mut headers);
        headers
    }

    /// Publishes `msg` on `subject` in a producer span (OpenTelemetry
    /// messaging conventions) whose context the message carries.
    pub async fn publish<T: Serialize>(&self, subject: String, msg: &T) -> Result<(), BusError> {
        let payload = tether_protocol::encode(msg)?;
        let span = messaging_span("publish", "producer", &subject);
        let headers = span.in_scope(Self::traced_headers);
        self.client
            .publish_with_headers(subject, headers, payload.into())
            .instrument(span)
            .await
            .map_err(|e| BusError::Publish(e.to_string()))
    }

    /// Sends a request and decodes the reply. Fails fast when disconnected.
    pub async fn request<T: Serialize, R: DeserializeOwned>(
        &self,
        subject: String,
        msg: &T,
        timeout: Duration,
    ) -> Result<R, BusError> {
        if !self.is_connected() {
            return Err(BusError::Disconnected);
        }
        let payload = tether_protocol::encode(msg)?;
        let span = messaging_span("request", "client", &subject);
        let request = async_nats::Request::new()
            .headers(span.in_scope(Self::traced_headers))
            .payload(payload.into())
            .timeout(Some(timeout));
        let reply = self
            .client
            .send_request(subject.clone(), request)
            .instrument(span)
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::NoResponders => BusError::NoResponders(subject.clone()),
                RequestErrorKind::TimedOut => BusError::TimedOut(subject.clone()),
                _ => BusError::Request(e.to_string()),
            })?;
        Ok(tether_protocol::decode(&reply.payload)?)
    }

    /// Answers a request message (no-op for a message without a reply subject).
    pub async fn respond<T: Serialize>(&self, request: &Message, msg: &T) -> Result<(), BusError> {
        let Some(reply) = request.reply.clone() else {
            return Ok(());
        };
        let payload = tether_protocol::encode(msg)?;
        self.client
            .publish_with_headers(reply, Self::traced_headers(), payload.into())
            .await
            .map_err(|e| BusError::Publish(e.to_string()))
    }

    /// Decodes a received message; a message that does not decode is
    /// counted under `kind`, logged (at most once a second, with the number
    /// not logged since) and dropped (None).
    pub fn decode<T: DeserializeOwned>(&self, msg: &Message, kind: &str) -> Option<T> {
        match tether_protocol::decode(&msg.payload) {
            Ok(v) => Some(v),
            Err(err) => {
                self.stats.count_decode_error(kind);
                // Rate-limited: a flood of garbage must not flood the log.
                if let Some(suppressed) = self.stats.decode_log.allow() {
                    tracing::warn!(subject = %msg.subject, %err, suppressed, "dropping undecodable message");
                }
                None
            }
        }
    }

    pub async fn subscribe(&self, subject: String) -> Result<async_nats::Subscriber, BusError> {
        self.client
            .subscribe(subject)
            .await
            .map_err(|e| BusError::Subscribe(e.to_string()))
    }

    pub async fn queue_subscribe(
        &self,
        subject: String,
        group: &str,
    ) -> Result<async_nats::Subscriber, BusError> {
        self.client
            .queue_subscribe(subject, group.to_owned())
            .await
            .map_err(|e| BusError::Subscribe(e.to_string()))
    }
}
