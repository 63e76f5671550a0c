//! The shard actor. One task per shard owns that shard's [`SessionTable`];
//! everything reaches it through its mailbox, so no lock is ever taken.
//!
//! Changes are batched: every `delta_interval` the sessions changed since the
//! last delta are published as one [`StateDelta`] with the next sequence
//! number (split into several deltas, each with its own number, when large).
//! Each changed record carries the number of the delta it goes out in as its
//! version, so replicas can merge deltas and snapshot pages in any order.

use std::collections::HashSet;
use std::time::Duration;
use tether_bus::Bus;
use tether_protocol::{
    RequestEvent, SessionHash, SessionQuery, SessionView, SnapshotPage, SnapshotRequest,
    StateDelta, now_ms, random_u64, shard_of, stable_hash,
};
use tether_session::{SessionTable, TableLimits};
use tether_telemetry::Shutdown;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::metrics::Metrics;

/// What a shard actor is asked to do.
pub enum ShardMsg {
    /// Apply an event; the span is the event's trace (from its NATS headers).
    Event(RequestEvent, tracing::Span),
    Snapshot(SnapshotRequest, oneshot::Sender<SnapshotPage>),
    Query(SessionQuery, oneshot::Sender<SessionView>),
}

pub type Mailbox = mpsc::Sender<ShardMsg>;

#[derive(Clone, Debug)]
pub struct ActorConfig {
    pub shards: u16,
    pub limits: TableLimits,
    pub delta_interval: Duration,
    pub max_delta_records: usize,
    pub evict_interval: Duration,
}

pub struct ShardActor {
    shard: u16,
    epoch: u64,
    /// Number of the last delta published.
    seq: u64,
    table: SessionTable,
    changed: HashSet<SessionHash>,
    evicted: Vec<SessionHash>,
    cfg: ActorConfig,
    bus: Bus,
    metrics: Metrics,
}

impl ShardActor {
    pub fn new(shard: u16, cfg: ActorConfig, bus: Bus, metrics: Metrics) -> Self {
        Self {
            shard,
            epoch: random_u64(),
            seq: 0,
            table: SessionTable::new(cfg.limits),
            changed: HashSet::new(),
            evicted: Vec::new(),
            cfg,
            bus,
            metrics,
        }
    }

    /// Spawns the actor; returns its mailbox.
    pub fn spawn(
        self,
        capacity: usize,
        shutdown: Shutdown,
    ) -> (Mailbox, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let shard = self.shard;
        let handle = tokio::spawn(
            self.run(rx, shutdown)
                .instrument(tracing::info_span!("shard", shard)),
        );
        (tx, handle)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<ShardMsg>, shutdown: Shutdown) {
        let mut flush =
            tokio::time::interval(self.cfg.delta_interval.max(Duration::from_millis(1)));
        flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut evict =
            tokio::time::interval(self.cfg.evict_interval.max(Duration::from_millis(10)));
        evict.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tracing::debug!(epoch = self.epoch, "shard actor started");
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                msg = rx.recv() => match msg {
                    Some(msg) => self.handle(msg),
                    None => break,
                },
                _ = flush.tick() => self.flush().await,
                _ = evict.tick() => self.evict(now_ms()),
            }
        }
        self.flush().await;
    }

    fn handle(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Event(event, span) => {
                let _entered = span.enter();
                self.apply(&event);
            }
            ShardMsg::Snapshot(req, reply) => {
                self.metrics.snapshots.inc();
                let limit = usize::try_from(req.limit)
                    .unwrap_or(usize::MAX)
                    .clamp(1, 10_000);
                let (sessions, next) = self.table.page(req.after, limit);
                let _ = reply.send(SnapshotPage {
                    shard: self.shard,
                    epoch: self.epoch,
                    seq: self.seq,
                    sessions,
                    next,
                });
            }
            ShardMsg::Query(q, reply) => {
                self.metrics.queries.inc();
                let hash = stable_hash(q.session_key.as_bytes());
                let state = self.table.get(hash);
                let _ = reply.send(SessionView {
                    shard: self.shard,
                    record: state.map(|s| s.record(hash)),
                    in_flight_calls: state
                        .map(|s| s.in_flight.iter().map(|(id, _)| *id).collect())
                        .unwrap_or_default(),
                    session_key: q.session_key,
                });
            }
        }
    }

    /// Applies one event (public for tests and benchmarks).
    pub fn apply(&mut self, event: &RequestEvent) {
        if shard_of(event.session_hash, self.cfg.shards) != self.shard {
            self.metrics.misrouted.inc();
            tracing::warn!(
                session = event.session_hash,
                "event for another shard dropped"
            );
            return;
        }
        self.metrics.events.inc();
        let before = self.table.len();
        let applied = self.table.apply(event, self.seq + 1);
        if applied.refused {
            self.metrics.refused.inc();
        } else {
            self.changed.insert(event.session_hash);
        }
        self.note_evicted(applied.evicted);
        self.adjust_gauge(before);
    }

    fn evict(&mut self, now: u64) {
        let before = self.table.len();
        let (evicted, changed) = self.table.evict_idle(now);
        self.table.touch(&changed, self.seq + 1);
        self.changed.extend(changed);
        self.note_evicted(evicted);
        self.adjust_gauge(before);
    }

    fn note_evicted(&mut self, evicted: Vec<SessionHash>) {
        if evicted.is_empty() {
            return;
        }
        self.metrics.evicted.inc_by(evicted.len() as u64);
        for h in &evicted {
            self.changed.remove(h);
        }
        self.evicted.extend(evicted);
    }

    fn adjust_gauge(&self, before: usize) {
        let after = self.table.len();
        let delta =
            i64::try_from(after).unwrap_or(i64::MAX) - i64::try_from(before).unwrap_or(i64::MAX);
        if delta != 0 {
            self.metrics.sessions.inc_by(delta);
        }
    }

    /// Publishes what changed since the last flush.
    async fn flush(&mut self) {
        if self.changed.is_empty() && self.evicted.is_empty() {
            return;
        }
        let mut records: Vec<_> = self
            .changed
            .drain()
            .filter_map(|h| self.table.get(h).map(|s| s.record(h)))
            .collect();
        let mut evicted = std::mem::take(&mut self.evicted);
        let max = self.cfg.max_delta_records.max(1);
        loop {
            let take = records.len().min(max);
            let updated: Vec<_> = records.drain(..take).collect();
            let take_ev = evicted.len().min(max * 4);
            let gone: Vec<_> = evicted.drain(..take_ev).collect();
            self.seq += 1;
            // Records keep the version they were stamped with when changed
            // (the then-next sequence number); that is ≤ this delta's number.
            let delta = StateDelta {
                shard: self.shard,
                epoch: self.epoch,
                seq: self.seq,
                updated,
                evicted: gone,
            };
            self.metrics.deltas.inc();
            self.metrics
                .delta_records
                .inc_by(delta.updated.len() as u64);
            if let Err(err) = self
                .bus
                .publish(self.bus.subjects.state(self.shard), &delta)
                .await
            {
                tracing::warn!(%err, seq = self.seq, "delta publish failed; replicas will resync on the gap");
            }
            if records.is_empty() && evicted.is_empty() {
                break;
            }
        }
    }
}
