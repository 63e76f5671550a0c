//! One engine's stream: subscribe to its KV events publisher, check the
//! sequence numbers, replay what was missed, relay on `<p>.kv.<engine>`.
//!
//! The engine numbers its batches 0, 1, 2, … from its start. The relay
//! expects `next`:
//! - the first batch it sees (after start or a reconnect) with a number
//!   above 0: it asks for a replay from 0, so that what the engine cached
//!   before the relay listened is known too;
//! - a number above `next`: a gap — replay `next ..` that number;
//! - a number below `next`: the engine restarted (its numbering began
//!   again) — a reset, then as a first batch.
//!
//! A replay that cannot be had whole (no replay socket, a timeout, the
//! engine's buffer no longer holds the start) becomes a reset: receivers
//! forget everything they knew of the engine, and learn again from the
//! next batch on. A lost connection is a reset too (the engine may have
//! restarted with an empty cache). Every relayed message carries the
//! stream's epoch (random per relay start) and its own `seq` 1, 2, 3, …,
//! so that a receiver detects what it missed on NATS.

use bytes::Bytes;
use futures::StreamExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tether_bus::Bus;
use tether_protocol::{KvEvent, KvEventBatch, now_ms, random_u64};
use tether_telemetry::{AdminState, Shutdown};
use zeromq::{DealerSocket, Socket, SocketEvent, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use crate::metrics::{Metrics, engine, engine_and};
use crate::wire::{Batch, decode_batch, seq_of};

/// What a relay needs to know of its engine.
#[derive(Clone, Debug)]
pub struct Stream {
    pub engine: String,
    pub events: String,
    pub replay: Option<String>,
}

/// Counts connected streams; the service is ready when all are (and NATS
/// is connected).
#[derive(Clone)]
pub struct Readiness {
    pub admin: AdminState,
    pub connected: Arc<AtomicUsize>,
    pub total: usize,
}

impl Readiness {
    fn change(&self, up: bool, bus: &Bus) {
        if up {
            self.connected.fetch_add(1, Ordering::SeqCst);
        } else {
            self.connected.fetch_sub(1, Ordering::SeqCst);
        }
        self.refresh(bus);
    }

    /// Sets `/ready` from the streams and the bus.
    pub fn refresh(&self, bus: &Bus) {
        let all = self.connected.load(Ordering::SeqCst) == self.total;
        self.admin.set_ready(all && bus.is_connected());
    }
}

pub struct Relay {
    stream: Stream,
    bus: Bus,
    subject: String,
    metrics: Metrics,
    replay_timeout: Duration,
    epoch: u64,
    seq: u64,
    next: Option<u64>,
}

impl Relay {
    pub fn new(stream: Stream, bus: Bus, metrics: Metrics, replay_timeout: Duration) -> Self {
        let subject = bus.subjects.kv(&stream.engine);
        Self {
            stream,
            bus,
            subject,
            metrics,
            replay_timeout,
            epoch: random_u64(),
            seq: 0,
            next: None,
        }
    }

    /// Runs until `shutdown`: connects (retrying), relays, reconnects.
    pub async fn run(mut self, ready: Readiness, shutdown: Shutdown) {
        let name = self.stream.engine.clone();
        loop {
            let mut sub = SubSocket::new();
            let mut monitor = sub.monitor();
            if let Err(e) = sub.subscribe("").await {
                tracing::warn!(engine = %name, error = %e, "cannot subscribe");
            }
            // Waits for the engine (up to the library's connect timeout).
            let connected = tokio::select! {
                _ = shutdown.cancelled() => return,
                c = sub.connect(&self.stream.events) => c,
            };
            if let Err(e) = connected {
                tracing::warn!(engine = %name, endpoint = %self.stream.events, error = %e, "cannot connect to KV events; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
            tracing::info!(engine = %name, endpoint = %self.stream.events, "following KV events");
            self.metrics.connected.get_or_create(&engine(&name)).set(1);
            ready.change(true, &self.bus);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    ev = monitor.next() => match ev {
                        Some(SocketEvent::Disconnected(_)) => {
                            self.metrics.connected.get_or_create(&engine(&name)).set(0);
                            ready.change(false, &self.bus);
                            // The engine may come back empty: forget it. The
                            // library reconnects; the first batch then asks
                            // for a replay from 0.
                            self.reset("disconnect").await;
                            self.next = None;
                        }
                        Some(SocketEvent::Connected(..)) => {
                            if self.metrics.connected.get_or_create(&engine(&name)).get() == 0 {
                                self.metrics.connected.get_or_create(&engine(&name)).set(1);
                                ready.change(true, &self.bus);
                            }
                        }
                        Some(_) => {}
                        None => break,
                    },
                    msg = sub.recv() => match msg {
                        Ok(msg) => self.on_message(msg).await,
                        Err(e) => tracing::debug!(engine = %name, error = %e, "KV events receive error"),
                    },
                }
            }
        }
    }

    async fn on_message(&mut self, msg: ZmqMessage) {
        let name = self.stream.engine.clone();
        let frames = msg.into_vec();
        let decoded = match frames.as_slice() {
            [_topic, seq, payload] => seq_of(seq)
                .ok()
                .and_then(|s| u64::try_from(s).ok())
                .map(|s| (s, decode_batch(payload))),
            _ => None,
        };
        let Some((seq, batch)) = decoded else {
            self.metrics
                .decode_errors
                .get_or_create(&engine(&name))
                .inc();
            return;
        };
        match self.next {
            Some(n) if seq == n => {}
            Some(n) if seq > n => {
                self.metrics.gaps.get_or_create(&engine(&name)).inc();
                tracing::info!(engine = %name, expected = n, got = seq, "KV events gap");
                self.catch_up(n, seq).await;
            }
            Some(n) => {
                tracing::info!(engine = %name, expected = n, got = seq, "KV events sequence went back: engine restarted");
                self.reset("restart").await;
                if seq > 0 {
                    self.catch_up(0, seq).await;
                }
            }
            None if seq > 0 => self.catch_up(0, seq).await,
            None => {}
        }
        match batch {
            Ok(b) => self.relay(seq, b).await,
            Err(e) => {
                tracing::warn!(engine = %name, seq, error = %e, "undecodable KV events batch");
                self.metrics
                    .decode_errors
                    .get_or_create(&engine(&name))
                    .inc();
                self.reset("undecodable").await;
            }
        }
        self.next = Some(seq + 1);
    }

    /// Replays `from .. to`, relaying it; a reset if it cannot be had whole.
    async fn catch_up(&mut self, from: u64, to: u64) {
        let name = self.stream.engine.clone();
        let got = match &self.stream.replay {
            Some(ep) => tokio::time::timeout(self.replay_timeout, replay(ep, from, to))
                .await
                .map_err(|_| "timed out".to_owned())
                .and_then(|r| r),
            None => Err("no replay endpoint".to_owned()),
        };
        match got {
            Ok(batches) => {
                self.metrics
                    .replays
                    .get_or_create(&engine_and(&name, "outcome", "ok"))
                    .inc();
                for (seq, b) in batches {
                    self.relay(seq, b).await;
                }
            }
            Err(why) => {
                self.metrics
                    .replays
                    .get_or_create(&engine_and(&name, "outcome", "failed"))
                    .inc();
                tracing::info!(engine = %name, from, to, why, "KV events replay impossible; resetting");
                self.reset("gap").await;
            }
        }
    }

    async fn relay(&mut self, engine_seq: u64, b: Batch) {
        let name = &self.stream.engine;
        for e in &b.events {
            let (kind, n) = match e {
                KvEvent::Stored { hashes, .. } => ("stored", hashes.len()),
                KvEvent::Removed { hashes } => ("removed", hashes.len()),
                KvEvent::Cleared | KvEvent::Reset => ("cleared", 1),
            };
            self.metrics
                .blocks
                .get_or_create(&engine_and(name, "kind", kind))
                .inc_by(n as u64);
        }
        self.metrics.batches.get_or_create(&engine(name)).inc();
        let at_ms = if b.ts.is_finite() && b.ts > 0.0 {
            (b.ts * 1000.0) as u64
        } else {
            now_ms()
        };
        self.publish(engine_seq, at_ms, b.events).await;
    }

    async fn reset(&mut self, reason: &str) {
        let name = self.stream.engine.clone();
        self.metrics
            .resets
            .get_or_create(&engine_and(&name, "reason", reason))
            .inc();
        self.publish(0, now_ms(), vec![KvEvent::Reset]).await;
    }

    async fn publish(&mut self, engine_seq: u64, at_ms: u64, events: Vec<KvEvent>) {
        self.seq += 1;
        let msg = KvEventBatch {
            engine: self.stream.engine.clone(),
            epoch: self.epoch,
            seq: self.seq,
            engine_seq,
            at_ms,
            events,
        };
        if let Err(e) = self.bus.publish(self.subject.clone(), &msg).await {
            tracing::warn!(engine = %self.stream.engine, error = %e, "cannot publish KV events");
            self.metrics
                .publish_errors
                .get_or_create(&engine(&self.stream.engine))
                .inc();
        }
    }
}

/// Asks the engine's replay socket for batches `from ..`; returns those
/// before `to`, which must be all of `from .. to`.
async fn replay(endpoint: &str, from: u64, to: u64) -> Result<Vec<(u64, Batch)>, String> {
    let mut dealer = DealerSocket::new();
    dealer.connect(endpoint).await.map_err(|e| e.to_string())?;
    let request = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&from.to_be_bytes()),
    ])
    .map_err(|e| e.to_string())?;
    dealer.send(request).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut expect = from;
    loop {
        let frames = dealer.recv().await.map_err(|e| e.to_string())?.into_vec();
        let [_, seq, payload] = frames.as_slice() else {
            return Err(format!("a replay message of {} frames", frames.len()));
        };
        let seq = seq_of(seq).map_err(|e| e.to_string())?;
        if seq < 0 {
            break;
        }
        let seq = seq as u64;
        if seq < expect || seq >= to {
            continue;
        }
        if seq != expect {
            return Err(format!("the engine's buffer starts at {seq}, not {expect}"));
        }
        out.push((seq, decode_batch(payload).map_err(|e| e.to_string())?));
        expect += 1;
    }
    if expect != to {
        return Err(format!("the replay ended at {expect}, before {to}"));
    }
    Ok(out)
}
