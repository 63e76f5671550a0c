//! The shard actor. One task per shard owns that shard's [`SessionTable`];
//! everything reaches it through its mailbox, so no lock is ever taken.
//!
//! Changes are batched: every `delta_interval` the sessions changed since the
//! last delta are published as one [`StateDelta`] with the next sequence
//! number (split into several deltas, each with its own number, when large).
//! Each changed record carries the number of the delta it goes out in as its
//! version, so replicas can merge deltas and snapshot pages in any order.
//!
//! Durable mode: events arrive with their events-stream sequence; one at or
//! below the last applied sequence is a repeat and is skipped, so applying is
//! idempotent per event. The last delivery is acknowledged (ack-all) after
//! it was applied, at the next flush. Every `snapshot_interval`, and on
//! shutdown, the shard writes a snapshot of itself with the sequence it
//! reflects (see [`crate::snapshot`]).
//!
//! Every `announce_interval` the shard also publishes an empty delta (its
//! current sequence, no records): a scheduler that holds another epoch of the
//! shard learns that it restarted and resynchronises it even when it is idle.

use std::collections::HashSet;
use std::time::Duration;
use tether_bus::jetstream::JsMessage;
use tether_bus::{Bus, Rounds};
use tether_protocol::{
    RequestEvent, SessionHash, SessionQuery, SessionView, SnapshotPage, SnapshotRequest,
    StateDelta, now_ms, random_u64, shard_of, stable_hash,
};
use tether_session::{SessionTable, TableLimits};
use tether_telemetry::Shutdown;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::lease::Fence;
use crate::metrics::Metrics;
use crate::snapshot::{self, ShardSnapshotRef};

/// Turns each input of the shard's loop (events, each tick) may take per
/// round (tether_bus::rounds).
const TURN_BUDGET: u32 = 256;

/// What a shard actor is asked to do.
pub enum ShardMsg {
    /// Apply an event; the span is the event's trace (from its NATS headers).
    Event(RequestEvent, tracing::Span),
    /// A delivery from the events stream: its stream sequence, the event
    /// (None when it did not decode: counted by the intake, skipped here) and
    /// the message, to acknowledge once applied.
    Durable {
        seq: u64,
        event: Option<(RequestEvent, tracing::Span)>,
        msg: Box<JsMessage>,
    },
    /// The events stream restarted its numbering below what was applied:
    /// continue after this sequence.
    Rebase(u64),
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
    /// How often an empty delta announces the shard's epoch.
    pub announce_interval: Duration,
    /// How often a changed shard writes its snapshot (durable mode).
    pub snapshot_interval: Duration,
}

/// Where a durable shard writes its snapshots.
#[derive(Clone)]
pub struct SnapshotSink {
    pub store: tether_bus::jetstream::ObjectStore,
}

/// What a shard starts from: a restored snapshot, or nothing.
#[derive(Debug, Default)]
pub struct Restored {
    pub table: Option<SessionTable>,
    pub stream_seq: u64,
    pub delta_seq: u64,
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
    /// The last events-stream sequence applied (durable mode).
    applied: u64,
    /// The latest delivery applied and not yet acknowledged.
    unacked: Option<Box<JsMessage>>,
    sink: Option<SnapshotSink>,
    /// Changed since the last snapshot was taken.
    dirty: bool,
    /// The snapshot write under way; it returns whether it succeeded.
    writing: Option<tokio::task::JoinHandle<bool>>,
    /// While it holds, this process owns the shard (always, under static
    /// ownership); once it lapses nothing is applied, acknowledged or published.
    fence: Fence,
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
            applied: 0,
            unacked: None,
            sink: None,
            dirty: false,
            writing: None,
            fence: Fence::always(),
        }
    }

    /// A durable shard: starts from `restored` and writes snapshots to `sink`.
    pub fn durable(
        shard: u16,
        cfg: ActorConfig,
        bus: Bus,
        metrics: Metrics,
        restored: Restored,
        sink: SnapshotSink,
        fence: Fence,
    ) -> Self {
        let mut actor = Self::new(shard, cfg, bus, metrics);
        if let Some(table) = restored.table {
            actor
                .metrics
                .sessions
                .inc_by(i64::try_from(table.len()).unwrap_or(i64::MAX));
            actor.table = table;
        }
        actor.applied = restored.stream_seq;
        actor.seq = restored.delta_seq;
        actor.sink = Some(sink);
        actor.fence = fence;
        actor
    }

    /// The last events-stream sequence applied.
    pub fn applied(&self) -> u64 {
        self.applied
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
        let mut announce =
            tokio::time::interval(self.cfg.announce_interval.max(Duration::from_millis(10)));
        announce.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut snap =
            tokio::time::interval(self.cfg.snapshot_interval.max(Duration::from_millis(10)));
        snap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        snap.reset();
        tracing::debug!(
            epoch = self.epoch,
            applied = self.applied,
            "shard actor started"
        );
        // Events come first, but a steady stream of them cannot hold the
        // flush (and the other ticks) back more than a budget of events.
        let mut rounds = Rounds::<5>::new(TURN_BUDGET);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                msg = rx.recv(), if rounds.may(0) => {
                    rounds.took(0);
                    match msg {
                        Some(msg) => self.handle(msg),
                        None => break,
                    }
                }
                _ = flush.tick(), if rounds.may(1) => {
                    rounds.took(1);
                    self.flush().await;
                }
                _ = evict.tick(), if rounds.may(2) => {
                    rounds.took(2);
                    self.evict(now_ms());
                }
                _ = announce.tick(), if rounds.may(3) => {
                    rounds.took(3);
                    self.announce().await;
                }
                _ = snap.tick(), if rounds.may(4) => {
                    rounds.took(4);
                    self.snapshot(false).await;
                }
                _ = std::future::ready(()), if rounds.started() => rounds.next_round(),
            }
        }
        self.flush().await;
        self.snapshot(true).await;
    }

    /// Publishes an empty delta carrying the shard's epoch and sequence.
    async fn announce(&mut self) {
        if !self.fence.holds() {
            return;
        }
        let delta = StateDelta {
            shard: self.shard,
            epoch: self.epoch,
            seq: self.seq,
            updated: Vec::new(),
            evicted: Vec::new(),
        };
        if let Err(err) = self
            .bus
            .publish(self.bus.subjects.state(self.shard), &delta)
            .await
        {
            tracing::debug!(%err, "epoch announcement failed");
        }
    }

    /// Writes a snapshot when the shard changed since the last one (durable
    /// mode). The write runs off the actor; `last` (shutdown) waits for it.
    async fn snapshot(&mut self, last: bool) {
        let Some(sink) = self.sink.clone() else {
            return;
        };
        if !self.fence.holds() {
            return; // another owner may have the shard by now
        }
        if let Some(writing) = &self.writing {
            if !writing.is_finished() && !last {
                return; // the previous write is still going: next tick
            }
            if let Some(w) = self.writing.take()
                && !w.await.unwrap_or(false)
            {
                self.dirty = true; // the last write failed: write again
            }
        }
        if !self.dirty {
            return;
        }
        let bytes = match snapshot::encode(&ShardSnapshotRef {
            shard: self.shard,
            shards: self.cfg.shards,
            stream_seq: self.applied,
            delta_seq: self.seq,
            taken_ms: now_ms(),
            sessions: self.table.iter().map(|(h, s)| (*h, s)).collect(),
        }) {
            Ok(b) => b,
            Err(err) => {
                tracing::error!(%err, "snapshot could not be encoded");
                return;
            }
        };
        self.dirty = false;
        let shard = self.shard;
        let seq = self.applied;
        let metrics = self.metrics.clone();
        let write = async move {
            let name = tether_bus::jetstream::snapshot_object_name(shard);
            match sink.store.put(name.as_str(), &mut bytes.as_slice()).await {
                Ok(_) => {
                    metrics.snapshots_written.inc();
                    tracing::debug!(shard, seq, bytes = bytes.len(), "snapshot written");
                    true
                }
                Err(err) => {
                    metrics.snapshot_failures.inc();
                    tracing::warn!(shard, %err, "snapshot write failed; the next tick retries");
                    false
                }
            }
        };
        if last {
            if tokio::time::timeout(Duration::from_secs(10), write)
                .await
                .is_err()
            {
                tracing::warn!(shard, "final snapshot timed out");
            }
        } else {
            self.writing = Some(tokio::spawn(write));
        }
    }

    fn handle(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Event(event, span) => {
                let _entered = span.enter();
                self.apply(&event);
            }
            ShardMsg::Durable { seq, event, msg } => {
                if !self.fence.holds() {
                    self.metrics.fenced.inc();
                    return;
                }
                if seq <= self.applied {
                    self.metrics.duplicates.inc();
                    return;
                }
                if let Some((event, span)) = event {
                    let _entered = span.enter();
                    self.apply(&event);
                }
                self.applied = seq;
                self.dirty = true;
                self.unacked = Some(msg);
            }
            ShardMsg::Rebase(seq) => {
                self.applied = seq;
                self.dirty = true;
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
        self.dirty |= !evicted.is_empty() || !changed.is_empty();
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

    /// Acknowledges what was applied, then publishes what changed since the
    /// last flush.
    async fn flush(&mut self) {
        if !self.fence.holds() {
            self.unacked = None;
            return;
        }
        if let Some(msg) = self.unacked.take()
            && let Err(err) = msg.ack().await
        {
            tracing::debug!(%err, "ack failed; the delivery may repeat and is then skipped");
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use futures::StreamExt;
    use tether_bus::jetstream as js;
    use tether_protocol::EventKind;

    /// One real delivery from a real events stream, the actor that would
    /// apply it (1 shard), and the delivery's sequence.
    async fn setup(
        nats: &tether_testkit::NatsServer,
    ) -> anyhow::Result<(Bus, SnapshotSink, RequestEvent, JsMessage, u64)> {
        let config =
            crate::Config::try_parse_from(["x", "--nats-url", &nats.url(), "--shards", "1"])?;
        let bus = config.bus.connect("actor-test").await?;
        let context = bus.jetstream();
        let stream = js::ensure_events_stream(
            &context,
            &bus.subjects,
            js::EventsStreamConfig {
                max_age: Duration::from_secs(60),
                replicas: 1,
                duplicate_window: Duration::from_secs(10),
            },
        )
        .await?;
        let store = js::snapshot_store(&context, &bus.subjects, 1).await?;
        let event = RequestEvent {
            call_id: 1,
            session_hash: stable_hash(b"s"),
            session_key: "s".into(),
            at_ms: now_ms(),
            engine: "e".into(),
            kind: EventKind::Dispatched {
                inherited_cst: 0.0,
                level: 0,
            },
        };
        bus.publish_with_id(bus.subjects.events(0), &event, &js::event_msg_id(&event))
            .await?;
        bus.client.flush().await?;
        let consumer =
            js::shard_consumer(&stream, &bus.subjects, 0, 0, Duration::from_secs(30), 100).await?;
        let mut batch = consumer.fetch().max_messages(1).messages().await?;
        let msg = batch
            .next()
            .await
            .ok_or_else(|| anyhow::anyhow!("no delivery"))?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let seq = msg
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence;
        Ok((bus, SnapshotSink { store }, event, msg, seq))
    }

    fn cfg() -> ActorConfig {
        ActorConfig {
            shards: 1,
            limits: TableLimits::default(),
            delta_interval: Duration::from_millis(5),
            max_delta_records: 100,
            evict_interval: Duration::from_secs(60),
            announce_interval: Duration::from_secs(2),
            snapshot_interval: Duration::from_secs(10),
        }
    }

    #[tokio::test]
    async fn deliveries_apply_once_and_only_under_a_holding_fence() -> anyhow::Result<()> {
        let nats = tether_testkit::NatsServer::start()?;
        let (bus, sink, event, msg, seq) = setup(&nats).await?;
        let hash = event.session_hash;
        let delivery = |msg: JsMessage| ShardMsg::Durable {
            seq,
            event: Some((event.clone(), tracing::Span::none())),
            msg: Box::new(msg),
        };

        // A lapsed lease: nothing is applied.
        let metrics = Metrics::default();
        let lapsed = crate::lease::Fence::until(std::time::Instant::now());
        let mut fenced = ShardActor::durable(
            0,
            cfg(),
            bus.clone(),
            metrics.clone(),
            Restored::default(),
            sink.clone(),
            lapsed,
        );
        fenced.handle(delivery(msg.clone()));
        assert!(fenced.table.get(hash).is_none());
        assert_eq!((fenced.applied(), metrics.fenced.get()), (0, 1));

        // An owner applies it once; the repeat is skipped.
        let metrics = Metrics::default();
        let mut owner = ShardActor::durable(
            0,
            cfg(),
            bus,
            metrics.clone(),
            Restored::default(),
            sink,
            crate::lease::Fence::always(),
        );
        owner.handle(delivery(msg.clone()));
        owner.handle(delivery(msg));
        assert_eq!(owner.table.get(hash).map(|s| s.requests), Some(1));
        assert_eq!((owner.applied(), metrics.duplicates.get()), (seq, 1));
        Ok(())
    }
}
