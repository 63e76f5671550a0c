//! The scheduler actor. One task owns the replica and the engine loads and
//! takes, in turn: route requests, state deltas, request events, snapshot
//! pages and a housekeeping tick. Decisions are made from memory; nothing on
//! the route path waits on I/O except sending the reply.

use futures::StreamExt;
use std::time::Duration;
use tether_bus::{Bus, Rounds, Subscriber};
use tether_protocol::{KvEventBatch, RequestEvent, RouteReply, RouteRequest, StateDelta, now_ms};
use tether_telemetry::{AdminState, Shutdown};
use tokio::sync::mpsc;

use crate::decider::Decider;
use crate::metrics::{Metrics, label};
use crate::replica::DeltaOutcome;
use crate::resync::{ResyncMsg, spawn_resync};

pub struct Subscriptions {
    pub route: Subscriber,
    pub state: Subscriber,
    pub events: Subscriber,
    /// `<p>.kv.*`, when the exact index is on.
    pub kv: Option<Subscriber>,
}

pub struct Core {
    pub decider: Decider,
    pub bus: Bus,
    pub metrics: Metrics,
    pub admin: AdminState,
    pub shards: u16,
    pub page_size: u32,
    pub call_timeout: Duration,
    resyncing: Vec<bool>,
    /// Engines whose KV snapshot is being fetched.
    kv_fetching: Vec<bool>,
    /// Their batches arrived meanwhile, applied after the snapshot (at most
    /// [`KV_PENDING_CAP`] per engine; beyond, they are applied at once).
    kv_pending: Vec<Vec<KvEventBatch>>,
}

const KV_PENDING_CAP: usize = 10_000;

/// Turns each input of the actor's loop may take per round
/// (tether_bus::rounds).
const TURN_BUDGET: u32 = 64;

/// A fetched KV snapshot: engine index, then `(epoch, seq, blocks)`.
type KvSnapshot = (usize, Result<(u64, u64, Vec<(u64, u64)>), String>);

impl Core {
    pub fn new(
        decider: Decider,
        bus: Bus,
        metrics: Metrics,
        admin: AdminState,
        shards: u16,
        page_size: u32,
        call_timeout: Duration,
    ) -> Self {
        Self {
            decider,
            bus,
            metrics,
            admin,
            shards,
            page_size,
            call_timeout,
            resyncing: vec![false; usize::from(shards)],
            kv_fetching: Vec::new(),
            kv_pending: Vec::new(),
        }
    }

    pub async fn run(mut self, mut subs: Subscriptions, shutdown: Shutdown) {
        let (resync_tx, mut resync_rx) = mpsc::channel(64);
        for shard in 0..self.shards {
            self.start_resync(shard, &resync_tx);
        }
        let (kv_tx, mut kv_rx) = mpsc::channel::<KvSnapshot>(16);
        self.kv_fetching = vec![false; self.decider.kv.engines()];
        self.kv_pending = vec![Vec::new(); self.decider.kv.engines()];
        self.fetch_kv_snapshots(&kv_tx);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Route requests come first, but no input waits more than twice the
        // others' budgets behind them (tether_bus::rounds).
        let mut rounds = Rounds::<7>::new(TURN_BUDGET);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(msg) = subs.route.next(), if rounds.may(0) => {
                    rounds.took(0);
                    self.route(msg).await;
                }
                Some(msg) = subs.state.next(), if rounds.may(1) => {
                    rounds.took(1);
                    self.delta(msg, &resync_tx);
                }
                Some(msg) = subs.events.next(), if rounds.may(2) => {
                    rounds.took(2);
                    if let Some(e) = self.bus.decode::<RequestEvent>(&msg, "events") {
                        self.decider.observe_event(&e);
                    }
                }
                Some(msg) = async {
                    match subs.kv.as_mut() {
                        Some(s) => s.next().await,
                        None => std::future::pending().await,
                    }
                }, if rounds.may(3) => {
                    rounds.took(3);
                    self.kv_batch(msg, &kv_tx);
                }
                Some(snap) = kv_rx.recv(), if rounds.may(4) => {
                    rounds.took(4);
                    self.kv_snapshot(snap, &kv_tx);
                }
                Some(msg) = resync_rx.recv(), if rounds.may(5) => {
                    rounds.took(5);
                    self.resync_msg(msg);
                }
                _ = tick.tick(), if rounds.may(6) => {
                    rounds.took(6);
                    self.housekeeping(&resync_tx);
                    self.fetch_kv_snapshots(&kv_tx);
                }
                _ = std::future::ready(()), if rounds.started() => rounds.next_round(),
                else => break,
            }
        }
        let _ = subs.route.unsubscribe().await;
    }

    async fn route(&mut self, msg: tether_bus::Message) {
        let span = tracing::info_span!(
            "scheduler.route",
            otel.kind = "server",
            call_id = tracing::field::Empty,
            engine = tracing::field::Empty,
            tether.session.hash = tracing::field::Empty,
            tether.route.reason = tracing::field::Empty,
            tether.level = tracing::field::Empty,
        );
        tether_bus::follow(&span, &msg);
        // A request that does not decode is counted in
        // tether_bus_decode_errors{kind="route"}, not as "no engine".
        let mut garbage = false;
        let reply = match self.bus.decode::<RouteRequest>(&msg, "route") {
            Some(req) => {
                span.record("call_id", req.call_id);
                span.record(
                    "tether.session.hash",
                    tracing::field::display(format_args!("{:016x}", req.session_hash)),
                );
                self.decider.decide(&req, now_ms())
            }
            None => {
                garbage = true;
                RouteReply::NoEngine {
                    reason: "route request did not decode".into(),
                }
            }
        };
        match &reply {
            RouteReply::Decision(d) => {
                span.record("engine", d.engine.as_str());
                span.record("tether.route.reason", d.reason.as_str());
                span.record("tether.level", d.level);
                self.metrics
                    .decisions
                    .get_or_create(&[("reason", d.reason.as_str())])
                    .inc();
                let note = self.decider.last;
                self.metrics
                    .affinity
                    .get_or_create(&[("affinity", note.affinity())])
                    .inc();
                self.metrics
                    .prefix
                    .get_or_create(&[("prefix", note.prefix())])
                    .inc();
            }
            RouteReply::NoEngine { .. } if garbage => {}
            RouteReply::NoEngine { .. } => {
                self.metrics.no_engine.inc();
            }
        }
        let _g = span.enter();
        if let Err(err) = self.bus.respond(&msg, &reply).await {
            tracing::warn!(%err, "route reply failed");
        }
    }

    fn delta(&mut self, msg: tether_bus::Message, resync_tx: &mpsc::Sender<ResyncMsg>) {
        let Some(d) = self.bus.decode::<StateDelta>(&msg, "state") else {
            return;
        };
        self.metrics.deltas.inc();
        if let Some(newest) = d.updated.iter().map(|r| r.last_active_ms).max() {
            let lag_ms = now_ms().saturating_sub(newest);
            self.metrics.delta_lag.0.observe(lag_ms as f64 / 1000.0);
        }
        match self.decider.apply_delta(&d) {
            DeltaOutcome::InOrder => {}
            DeltaOutcome::NeedsResync | DeltaOutcome::Unsynced => {
                self.start_resync(d.shard, resync_tx)
            }
        }
    }

    /// Applies an engine's KV events to the exact index.
    fn kv_batch(&mut self, msg: tether_bus::Message, kv_tx: &mpsc::Sender<KvSnapshot>) {
        let Some(b) = self.bus.decode::<KvEventBatch>(&msg, "kv") else {
            return;
        };
        if let Some(i) = self.decider.engine_index(&b.engine)
            && self.kv_fetching.get(i).copied().unwrap_or(false)
            && let Some(pending) = self.kv_pending.get_mut(i)
            && pending.len() < KV_PENDING_CAP
        {
            pending.push(b);
            return;
        }
        self.kv_apply(b, kv_tx);
    }

    fn kv_apply(&mut self, b: KvEventBatch, kv_tx: &mpsc::Sender<KvSnapshot>) {
        let outcome = match self.decider.engine_index(&b.engine) {
            Some(i) => self.decider.kv.apply(i, &b),
            None => crate::kv_index::Applied::UnknownEngine,
        };
        let outcome = match outcome {
            crate::kv_index::Applied::Ok => "ok",
            crate::kv_index::Applied::Resynced => {
                // Purged after a gap: start again from the relay's snapshot.
                if let Some(i) = self.decider.engine_index(&b.engine) {
                    self.fetch_kv_snapshot(i, kv_tx);
                }
                "resynced"
            }
            crate::kv_index::Applied::UnknownEngine => "unknown",
            crate::kv_index::Applied::Duplicate => "duplicate",
        };
        self.metrics
            .kv_batches
            .get_or_create(&label("outcome", outcome))
            .inc();
        self.metrics
            .kv_blocks
            .set(i64::try_from(self.decider.kv.len()).unwrap_or(i64::MAX));
    }

    /// Fetches the snapshot of every engine with KV events whose events do
    /// not flow yet (at start, and retried each tick until they do).
    fn fetch_kv_snapshots(&mut self, kv_tx: &mpsc::Sender<KvSnapshot>) {
        for i in 0..self.kv_fetching.len() {
            let has_events = self
                .decider
                .fleet
                .engines
                .get(i)
                .is_some_and(|e| e.kv_events.is_some());
            if has_events && !self.decider.kv.active(i) {
                self.fetch_kv_snapshot(i, kv_tx);
            }
        }
    }

    fn fetch_kv_snapshot(&mut self, engine: usize, kv_tx: &mpsc::Sender<KvSnapshot>) {
        let Some(busy) = self.kv_fetching.get_mut(engine) else {
            return;
        };
        if *busy {
            return;
        }
        *busy = true;
        let (bus, tx) = (self.bus.clone(), kv_tx.clone());
        let name = self.decider.fleet.engines[engine].name.clone();
        tokio::spawn(async move {
            let got = crate::kv_index::fetch_snapshot(&bus, &name, 50_000).await;
            let _ = tx.send((engine, got)).await;
        });
    }

    fn kv_snapshot(&mut self, (engine, got): KvSnapshot, kv_tx: &mpsc::Sender<KvSnapshot>) {
        if let Some(b) = self.kv_fetching.get_mut(engine) {
            *b = false;
        }
        let pending = self
            .kv_pending
            .get_mut(engine)
            .map(std::mem::take)
            .unwrap_or_default();
        let outcome = match got {
            Ok((epoch, seq, blocks)) => {
                if self.decider.kv.load_snapshot(engine, epoch, seq, &blocks) {
                    "loaded"
                } else {
                    "stale"
                }
            }
            Err(error) => {
                tracing::debug!(engine, %error, "KV snapshot fetch failed; will retry");
                "failed"
            }
        };
        self.metrics
            .kv_snapshots
            .get_or_create(&label("outcome", outcome))
            .inc();
        // What arrived meanwhile: those the snapshot holds are duplicates.
        for b in pending {
            self.kv_apply(b, kv_tx);
        }
        self.metrics
            .kv_blocks
            .set(i64::try_from(self.decider.kv.len()).unwrap_or(i64::MAX));
    }

    fn start_resync(&mut self, shard: u16, tx: &mpsc::Sender<ResyncMsg>) {
        let Some(busy) = self.resyncing.get_mut(usize::from(shard)) else {
            return;
        };
        if *busy {
            return;
        }
        *busy = true;
        self.metrics.resyncs.inc();
        spawn_resync(self.bus.clone(), shard, self.page_size, tx.clone());
    }

    fn resync_msg(&mut self, msg: ResyncMsg) {
        match msg {
            ResyncMsg::Page(page) => self.decider.apply_page(&page),
            ResyncMsg::Done { shard, epoch, seq } => {
                self.decider.replica.mark_synced(shard, epoch, seq);
                if let Some(b) = self.resyncing.get_mut(usize::from(shard)) {
                    *b = false;
                }
                tracing::debug!(shard, epoch, seq, "shard synchronised");
            }
            ResyncMsg::Failed { shard, error } => {
                self.metrics.resync_failures.inc();
                if let Some(b) = self.resyncing.get_mut(usize::from(shard)) {
                    *b = false;
                }
                tracing::debug!(shard, %error, "shard resync failed; will retry");
            }
        }
        if !self.admin.is_ready() && self.resyncing.iter().all(|b| !b) {
            // First round of snapshots done (or failed: an empty replica still routes).
            self.admin.set_ready(true);
        }
    }

    fn housekeeping(&mut self, resync_tx: &mpsc::Sender<ResyncMsg>) {
        let cutoff = now_ms()
            .saturating_sub(u64::try_from(self.call_timeout.as_millis()).unwrap_or(u64::MAX));
        let expired = self.decider.loads.expire(cutoff);
        self.decider.kv.expire(now_ms());
        self.metrics
            .kv_blocks
            .set(i64::try_from(self.decider.kv.len()).unwrap_or(i64::MAX));
        let flowing = (0..self.decider.fleet.engines.len())
            .filter(|i| self.decider.kv.active(*i))
            .count();
        self.metrics
            .kv_engines
            .set(i64::try_from(flowing).unwrap_or(i64::MAX));
        self.metrics.expired_calls.inc_by(expired as u64);
        let unsynced: Vec<u16> = self.decider.replica.unsynced().collect();
        for shard in unsynced {
            self.start_resync(shard, resync_tx);
        }
        self.metrics
            .sessions
            .set(i64::try_from(self.decider.replica.len()).unwrap_or(i64::MAX));
        for (i, e) in self.decider.fleet.engines.iter().enumerate() {
            self.metrics
                .in_flight
                .get_or_create(&label("engine", &e.name))
                .set(i64::from(self.decider.loads.in_flight(i)));
            self.metrics
                .healthy
                .get_or_create(&label("engine", &e.name))
                .set(i64::from(self.decider.health.is_healthy(i)));
        }
    }
}
