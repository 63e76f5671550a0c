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
//!
//! The relay also keeps what each engine holds (hash → parent, from the
//! events it relays; 40–50 bytes a block) and serves it in pages on
//! `<p>.kv-snapshot`, so that a new scheduler replica starts from it. A
//! first page takes a copy at the current `seq`; later pages read that copy,
//! so that all pages of one snapshot agree.

use bytes::Bytes;
use futures::StreamExt;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tether_bus::Bus;
use tether_protocol::{
    KvEvent, KvEventBatch, KvSnapshotPage, KvSnapshotRequest, now_ms, random_u64,
};
use tether_telemetry::{AdminState, Shutdown};
use tokio::sync::mpsc;
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
    /// What the engine holds, as relayed: hash → parent (0: none).
    held: BTreeMap<u64, u64>,
    /// The snapshot being paged: its `seq` and its blocks in hash order.
    frozen: Option<(u64, Vec<(u64, u64)>)>,
}

/// A snapshot request and the message to answer.
pub type SnapshotAsk = (KvSnapshotRequest, tether_bus::Message);

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
            held: BTreeMap::new(),
            frozen: None,
        }
    }

    /// Answers one page of a snapshot of what the engine holds.
    async fn answer(&mut self, req: KvSnapshotRequest, msg: tether_bus::Message) {
        if req.after.is_none() || self.frozen.is_none() {
            self.frozen = Some((self.seq, self.held.iter().map(|(h, p)| (*h, *p)).collect()));
        }
        let (seq, blocks) = self
            .frozen
            .as_ref()
            .map_or((0, &[][..]), |(s, b)| (*s, &b[..]));
        let start = req
            .after
            .map_or(0, |a| blocks.partition_point(|(h, _)| *h <= a));
        let limit = (req.limit.max(1) as usize).min(100_000);
        let page: Vec<(u64, u64)> = blocks[start..].iter().take(limit).copied().collect();
        let next = if start + page.len() < blocks.len() {
            page.last().map(|(h, _)| *h)
        } else {
            None
        };
        let reply = KvSnapshotPage {
            engine: self.stream.engine.clone(),
            epoch: self.epoch,
            seq,
            blocks: page,
            next,
        };
        if let Err(e) = self.bus.respond(&msg, &reply).await {
            tracing::warn!(engine = %self.stream.engine, error = %e, "cannot answer a KV snapshot request");
        }
    }

    /// Keeps `held` in step with what is relayed.
    fn track(&mut self, events: &[KvEvent]) {
        for e in events {
            match e {
                KvEvent::Stored { hashes, parent, .. } => {
                    let mut parent = parent.unwrap_or(0);
                    for h in hashes {
                        self.held.insert(*h, parent);
                        parent = *h;
                    }
                }
                KvEvent::Removed { hashes } => {
                    for h in hashes {
                        self.held.remove(h);
                    }
                }
                KvEvent::Cleared | KvEvent::Reset => self.held.clear(),
            }
        }
    }

    /// Runs until `shutdown`: connects (retrying), relays, reconnects.
    pub async fn run(
        mut self,
        ready: Readiness,
        mut snapshots: mpsc::Receiver<SnapshotAsk>,
        shutdown: Shutdown,
    ) {
        let name = self.stream.engine.clone();
        loop {
            let mut sub = SubSocket::new();
            let mut monitor = sub.monitor();
            if let Err(e) = sub.subscribe("").await {
                tracing::warn!(engine = %name, error = %e, "cannot subscribe");
            }
            // Waits for the engine (up to the library's connect timeout).
            let endpoint = self.stream.events.clone();
            let connected = {
                let connect = sub.connect(&endpoint);
                tokio::pin!(connect);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        c = &mut connect => break c,
                        Some((req, msg)) = snapshots.recv() => self.answer(req, msg).await,
                    }
                }
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
                    Some((req, msg)) = snapshots.recv() => self.answer(req, msg).await,
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
        self.track(&events);
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
