//! The scheduler actor. One task owns the replica and the engine loads and
//! takes, in turn: route requests, state deltas, request events, snapshot
//! pages and a housekeeping tick. Decisions are made from memory; nothing on
//! the route path waits on I/O except sending the reply.

use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tether_bus::{Bus, Subscriber};
use tether_fleet::{FleetConfig, FleetHealth, FleetLoad};
use tether_policy::{
    Affinity, CacheAwareConfig, EngineLoad, Inputs, PlacementConfig, PriorityConfig, PriorityMode,
    SessionService, Strategy, call_level, choose, freshness,
};
use tether_protocol::{
    EventKind, RequestEvent, RouteDecision, RouteReply, RouteRequest, StateDelta, now_ms,
    stable_hash,
};
use tether_telemetry::{AdminState, Shutdown};
use tokio::sync::mpsc;

use crate::load::EngineLoads;
use crate::metrics::{Metrics, label};
use crate::prefix::PrefixIndex;
use crate::replica::{DeltaOutcome, Replica};
use crate::resync::{ResyncMsg, spawn_resync};

/// The policy's knobs, as configured.
#[derive(Clone, Debug, Default)]
pub struct PolicyKnobs {
    pub strategy: Strategy,
    pub priority: PriorityConfig,
    pub placement: PlacementConfig,
    pub cache: CacheAwareConfig,
    /// Blocks held by the prefix index.
    pub prefix_blocks: usize,
}

/// KV-write marks count 64-token units.
const MARK_UNIT: f64 = 64.0;

/// Everything a decision reads, without the I/O around it (benchmarks and
/// tests drive this directly).
pub struct Decider {
    pub fleet: Arc<FleetConfig>,
    pub health: FleetHealth,
    /// The engines' own reported load (scraped).
    pub reported: FleetLoad,
    pub replica: Replica,
    pub loads: EngineLoads,
    pub prefix: PrefixIndex,
    pub knobs: PolicyKnobs,
    /// KV tokens each engine has written (prefilled + generated), from events.
    written: Vec<f64>,
    names: HashMap<String, usize>,
    /// Per model, which engines serve it; `serving_any` for models no engine
    /// lists (served by the engines that list none).
    serving: HashMap<String, Vec<bool>>,
    serving_any: Vec<bool>,
    name_hashes: Vec<u64>,
    turn: u64,
    scratch: Vec<EngineLoad>,
    ratios: Vec<f64>,
}

impl Decider {
    pub fn new(
        fleet: Arc<FleetConfig>,
        health: FleetHealth,
        reported: FleetLoad,
        shards: u16,
        knobs: PolicyKnobs,
    ) -> Self {
        let serving = fleet
            .models()
            .into_iter()
            .map(|m| {
                let mask = fleet.engines.iter().map(|e| e.serves(&m)).collect();
                (m, mask)
            })
            .collect();
        let serving_any = fleet.engines.iter().map(|e| e.models.is_empty()).collect();
        let names = fleet
            .engines
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        let name_hashes = fleet
            .engines
            .iter()
            .map(|e| stable_hash(e.name.as_bytes()))
            .collect();
        let n = fleet.engines.len();
        Self {
            loads: EngineLoads::new(n),
            prefix: PrefixIndex::new(knobs.prefix_blocks),
            written: vec![0.0; n],
            fleet,
            health,
            reported,
            replica: Replica::new(shards),
            knobs,
            names,
            serving,
            serving_any,
            name_hashes,
            turn: 0,
            scratch: Vec::new(),
            ratios: Vec::new(),
        }
    }

    pub fn engine_index(&self, name: &str) -> Option<usize> {
        self.names.get(name).copied()
    }

    fn mark(&self, engine: usize) -> u32 {
        let units = self.written.get(engine).copied().unwrap_or(0.0) / MARK_UNIT;
        // Wraps after 2^32 units (2.7e11 tokens); freshness handles wrap as stale.
        (units as u64 & u64::from(u32::MAX)) as u32
    }

    /// The load the policy sees for an engine: calls in flight as the system
    /// counts them, or what the engine itself reports running and waiting
    /// when that is more (it sees traffic Tether does not).
    pub fn load(&self, engine: usize) -> f64 {
        let s = self.reported.get(engine);
        f64::from(self.loads.in_flight(engine)).max(s.running + s.waiting)
    }

    /// Decides where and how urgently a call runs, and counts it as load.
    pub fn decide(&mut self, req: &RouteRequest, now_ms: u64) -> RouteReply {
        self.scratch.clear();
        let serving = self.serving.get(&req.model).unwrap_or(&self.serving_any);
        for (i, e) in self.fleet.engines.iter().enumerate() {
            let allowed = req.candidates.is_empty() || req.candidates.contains(&e.name);
            self.scratch.push(EngineLoad {
                healthy: allowed && serving[i] && self.health.is_healthy(i),
                load: self.load(i),
                id_hash: self.name_hashes[i],
            });
        }
        let session = self.replica.get(req.session_hash).copied();
        let service = session
            .map(|s| SessionService {
                cst: f64::from(s.cst),
                attained: f64::from(s.attained),
                wait: f64::from(s.wait),
            })
            .unwrap_or_default();
        let affinity = session.and_then(|s| {
            let engine = s.affinity()?;
            let since = f64::from(self.mark(engine).wrapping_sub(s.mark)) * MARK_UNIT;
            let capacity = self.fleet.engines.get(engine)?.cache_tokens as f64;
            Some(Affinity {
                engine,
                freshness: freshness(since, capacity),
            })
        });
        if req.block_hashes.is_empty() {
            self.ratios.clear();
        } else {
            self.prefix
                .match_ratios(&req.block_hashes, self.scratch.len(), &mut self.ratios);
        }
        self.turn = self.turn.wrapping_add(1);
        let inputs = Inputs {
            engines: &self.scratch,
            prefix_match: &self.ratios,
            affinity,
            session_hash: req.session_hash,
            turn: self.turn,
        };
        let Some(p) = choose(
            self.knobs.strategy,
            &self.knobs.placement,
            &self.knobs.cache,
            &inputs,
        ) else {
            return RouteReply::NoEngine {
                reason: format!("no healthy engine serves model {:?}", req.model),
            };
        };
        self.loads.start(req.call_id, p.engine, now_ms);
        let mark = self.mark(p.engine);
        self.replica.note_placement(
            req.session_hash,
            p.engine,
            mark,
            u32::try_from(now_ms / 1000).unwrap_or(u32::MAX),
        );
        self.prefix.insert(&req.block_hashes, p.engine);
        RouteReply::Decision(RouteDecision {
            call_id: req.call_id,
            engine: self.fleet.engines[p.engine].name.clone(),
            level: call_level(&self.knobs.priority, &service, req.prompt_tokens),
            inherited_cst: service.cst,
            service: match self.knobs.priority.mode {
                PriorityMode::Atlas => service.cst,
                PriorityMode::Plas => service.attained,
            },
            reason: p.reason,
        })
    }

    /// Counts load and KV writes from a request event (decisions of other
    /// replicas, fallbacks of the ingress).
    pub fn observe_event(&mut self, e: &RequestEvent) {
        let Some(engine) = self.engine_index(&e.engine) else {
            return;
        };
        match &e.kind {
            EventKind::Dispatched { .. } => self.loads.start(e.call_id, engine, e.at_ms),
            EventKind::Finished(f) => {
                self.loads.finish(e.call_id);
                let new_kv = f
                    .prompt_tokens
                    .saturating_sub(f.cached_tokens)
                    .saturating_add(f.completion_tokens);
                self.written[engine] += f64::from(new_kv);
            }
        }
        let mark = self.mark(engine);
        self.replica.note_placement(
            e.session_hash,
            engine,
            mark,
            u32::try_from(e.at_ms / 1000).unwrap_or(u32::MAX),
        );
    }

    pub fn apply_delta(&mut self, d: &StateDelta) -> DeltaOutcome {
        let names = &self.names;
        self.replica.apply_delta(d, |n| names.get(n).copied())
    }

    pub fn apply_page(&mut self, page: &tether_protocol::SnapshotPage) {
        let names = &self.names;
        self.replica.apply_page(page, |n| names.get(n).copied());
    }
}

pub struct Subscriptions {
    pub route: Subscriber,
    pub state: Subscriber,
    pub events: Subscriber,
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
}

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
        }
    }

    pub async fn run(mut self, mut subs: Subscriptions, shutdown: Shutdown) {
        let (resync_tx, mut resync_rx) = mpsc::channel(64);
        for shard in 0..self.shards {
            self.start_resync(shard, &resync_tx);
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(msg) = subs.route.next() => self.route(msg).await,
                Some(msg) = subs.state.next() => self.delta(msg, &resync_tx),
                Some(msg) = subs.events.next() => {
                    if let Some(e) = self.bus.decode::<RequestEvent>(&msg, "events") {
                        self.decider.observe_event(&e);
                    }
                }
                Some(msg) = resync_rx.recv() => self.resync_msg(msg),
                _ = tick.tick() => self.housekeeping(&resync_tx),
                else => break,
            }
        }
        let _ = subs.route.unsubscribe().await;
    }

    async fn route(&mut self, msg: tether_bus::Message) {
        let span = tracing::info_span!(
            "scheduler.route",
            call_id = tracing::field::Empty,
            engine = tracing::field::Empty
        );
        tether_bus::follow(&span, &msg);
        let reply = match self.bus.decode::<RouteRequest>(&msg, "route") {
            Some(req) => {
                span.record("call_id", req.call_id);
                self.decider.decide(&req, now_ms())
            }
            None => RouteReply::NoEngine {
                reason: "route request did not decode".into(),
            },
        };
        match &reply {
            RouteReply::Decision(d) => {
                span.record("engine", d.engine.as_str());
                self.metrics
                    .decisions
                    .get_or_create(&label("reason", d.reason.as_str()))
                    .inc();
            }
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
        match self.decider.apply_delta(&d) {
            DeltaOutcome::InOrder => {}
            DeltaOutcome::NeedsResync | DeltaOutcome::Unsynced => {
                self.start_resync(d.shard, resync_tx)
            }
        }
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
