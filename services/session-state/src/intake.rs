//! The event intake of one owned shard, decoded and fed to its actor.
//!
//! - Durable mode ([`spawn_durable_intake`], the default): the shard's
//!   durable pull consumer on the events stream, started after the sequence
//!   the shard's snapshot reflects. Deliveries are forwarded in stream order
//!   with their sequence; a delivery at or below the last forwarded sequence
//!   (a redelivery) is skipped. After a reconnect, or an error on the
//!   consumer's message stream, messages may have been lost in flight while
//!   later ones arrive, so the consumer is recreated from the last forwarded
//!   sequence + 1 instead of trusting what comes next.
//! - Memory-only mode ([`spawn_intake`], `--durable false`): a core-NATS
//!   subscription; what arrives while the service is down is lost.
//!
//! The mailbox send waits when the actor is behind, so pressure builds in
//! the consumer (bounded by its `max_ack_pending`) or, in memory-only mode,
//! in the subscription's buffer (a slow consumer there is counted).

use futures::StreamExt;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tether_bus::Bus;
use tether_bus::jetstream::{JetStreamError, JsStream, shard_consumer};
use tether_protocol::RequestEvent;
use tether_telemetry::Shutdown;

use crate::actor::{Mailbox, ShardMsg};
use crate::lease::Fence;
use crate::metrics::Metrics;

/// How a shard's durable consumer is set up.
#[derive(Clone, Debug)]
pub struct DurableIntake {
    pub stream: JsStream,
    pub ack_wait: Duration,
    pub max_ack_pending: i64,
    /// Messages asked for per pull request.
    pub batch: usize,
    pub metrics: Metrics,
}

/// Starts the shard's durable intake after stream sequence `after`. The
/// consumer is created before this returns, so a start-up failure shows.
pub async fn spawn_durable_intake(
    bus: &Bus,
    intake: DurableIntake,
    shard: u16,
    after: u64,
    mailbox: Mailbox,
    fence: Fence,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, JetStreamError> {
    let subjects = bus.subjects.clone();
    let create = move |after: u64, intake: DurableIntake, subjects: tether_protocol::Subjects| async move {
        shard_consumer(
            &intake.stream,
            &subjects,
            shard,
            after,
            intake.ack_wait,
            intake.max_ack_pending,
        )
        .await
    };
    let first = create(after, intake.clone(), subjects.clone()).await?;
    let bus = bus.clone();
    let metrics = intake.metrics.clone();
    Ok(tokio::spawn(async move {
        let mut forwarded = after;
        let mut next = Some(first);
        while !shutdown.is_cancelled() {
            let consumer = match next.take() {
                Some(c) => c,
                // Only an owner recreates the consumer (fenced by its lease).
                None if !fence.holds() => break,
                None => {
                    // A stream that lost events (recreated, or its server
                    // lost data) numbers new ones from below what was
                    // applied: continue from its end instead of skipping them.
                    let mut stream = intake.stream.clone();
                    if let Ok(info) = stream.info().await
                        && info.state.last_sequence < forwarded
                    {
                        metrics.replay_gaps.inc();
                        tracing::error!(
                            shard,
                            forwarded,
                            last = info.state.last_sequence,
                            "the events stream is behind what was applied (recreated or lost \
                             data); continuing from its end"
                        );
                        forwarded = info.state.last_sequence;
                        if mailbox.send(ShardMsg::Rebase(forwarded)).await.is_err() {
                            return;
                        }
                    }
                    match create(forwarded, intake.clone(), subjects.clone()).await {
                        Ok(c) => {
                            metrics.consumer_restarts.inc();
                            c
                        }
                        Err(err) => {
                            tracing::warn!(%err, shard, "recreating the shard consumer failed; retrying");
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                            }
                        }
                    }
                }
            };
            let connects = bus.client.statistics().connects.load(Ordering::Relaxed);
            let mut messages = match consumer
                .stream()
                .max_messages_per_batch(intake.batch.max(1))
                .heartbeat(Duration::from_secs(5))
                .messages()
                .await
            {
                Ok(m) => m,
                Err(err) => {
                    tracing::warn!(%err, shard, "pulling from the shard consumer failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            };
            loop {
                let item = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    item = messages.next() => item,
                };
                let msg = match item {
                    Some(Ok(msg)) => msg,
                    Some(Err(err)) => {
                        tracing::debug!(%err, shard, "shard consumer stream error; resuming from the last sequence");
                        break;
                    }
                    None => break,
                };
                if bus.client.statistics().connects.load(Ordering::Relaxed) != connects {
                    tracing::debug!(
                        shard,
                        forwarded,
                        "reconnected; resuming from the last sequence"
                    );
                    break;
                }
                let Ok(info) = msg.info() else {
                    continue; // not a stream delivery (a status message)
                };
                let seq = info.stream_sequence;
                if seq <= forwarded {
                    metrics.duplicates.inc();
                    continue;
                }
                let event = bus.decode::<RequestEvent>(&msg, "events").map(|event| {
                    let span = tracing::info_span!(
                        "session_state.apply",
                        otel.kind = "consumer",
                        shard,
                        call_id = event.call_id,
                        seq,
                        tether.session.hash = %format_args!("{:016x}", event.session_hash),
                    );
                    tether_bus::follow(&span, &msg);
                    (event, span)
                });
                forwarded = seq;
                let delivery = ShardMsg::Durable {
                    seq,
                    event,
                    msg: Box::new(msg),
                };
                if mailbox.send(delivery).await.is_err() {
                    return;
                }
            }
        }
    }))
}

pub async fn spawn_intake(
    bus: &Bus,
    shard: u16,
    mailbox: Mailbox,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, tether_bus::BusError> {
    let mut sub = bus.subscribe(bus.subjects.events(shard)).await?;
    let bus = bus.clone();
    Ok(tokio::spawn(async move {
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => break,
                msg = sub.next() => match msg { Some(m) => m, None => break },
            };
            let Some(event) = bus.decode::<RequestEvent>(&msg, "events") else {
                continue;
            };
            let span = tracing::info_span!(
                "session_state.apply",
                otel.kind = "consumer",
                shard,
                call_id = event.call_id,
                tether.session.hash = %format_args!("{:016x}", event.session_hash),
            );
            tether_bus::follow(&span, &msg);
            if mailbox.send(ShardMsg::Event(event, span)).await.is_err() {
                break;
            }
        }
        let _ = sub.unsubscribe().await;
    }))
}
