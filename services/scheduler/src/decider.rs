//! The pure decider: everything a route decision reads — the replica of
//! session state, engine loads, the prefix index — and the call into the
//! policy (`tether-policy`). No I/O: the actor in [`crate::core`] feeds it,
//! and benchmarks and tests drive it directly.

use std::collections::HashMap;
use std::sync::Arc;
use tether_fleet::{FleetConfig, FleetHealth, FleetLoad};
use tether_policy::{
    Affinity, EngineLoad, Inputs, PolicyConfig, PriorityMode, SessionService, Strategy, call_level,
    choose, freshness,
};
use tether_protocol::CallId;
use tether_protocol::hash::BuildU64Hasher;
use tether_protocol::{
    EventKind, RequestEvent, RouteDecision, RouteReason, RouteReply, RouteRequest, StateDelta,
    stable_hash,
};

use crate::kv_index::KvIndex;
use crate::load::EngineLoads;
use crate::prefix::PrefixIndex;
use crate::replica::{DeltaOutcome, Replica};

/// The policy's knobs, as configured.
#[derive(Clone, Debug, Default)]
pub struct PolicyKnobs {
    /// The policy (the scheduler reads its strategy, priority, placement,
    /// cache thresholds and cost model; the gate and capacity parts are the
    /// ingress's).
    pub policy: PolicyConfig,
    /// Blocks held by the prefix index.
    pub prefix_blocks: usize,
}

/// What the last decision did, for the metrics: the affinity kept or moved,
/// the prefix match taken against the best available.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DecisionNote {
    /// The session's affinity engine before the decision, if any.
    pub had_affinity: Option<usize>,
    /// The chosen engine.
    pub engine: usize,
    /// The chosen engine's prefix match ratio, and the best any healthy engine had.
    pub chosen_match: f64,
    pub best_match: f64,
}

impl DecisionNote {
    pub fn affinity(&self) -> &'static str {
        match self.had_affinity {
            None => "none",
            Some(a) if a == self.engine => "kept",
            Some(_) => "moved",
        }
    }

    pub fn prefix(&self) -> &'static str {
        if self.best_match <= 0.0 {
            "none"
        } else if self.chosen_match + 1e-9 >= self.best_match {
            "best"
        } else {
            "shorter"
        }
    }
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
    /// The exact index (engines' KV events); empty and inert unless the
    /// service enables it (`--prefix-source exact`).
    pub kv: KvIndex,
    pub knobs: PolicyKnobs,
    /// KV tokens each engine has written (prefilled + generated), from events.
    written: Vec<f64>,
    names: HashMap<String, usize>,
    /// Per model, which engines serve it; `serving_any` for models no engine
    /// lists (served by the engines that list none). A fleet serves few
    /// models: a linear scan beats hashing the name on every call.
    serving: Vec<(String, Vec<bool>)>,
    serving_any: Vec<bool>,
    name_hashes: Vec<u64>,
    turn: u64,
    scratch: Vec<EngineLoad>,
    ratios: Vec<f64>,
    /// What the last decision did.
    pub last: DecisionNote,
    /// Calls decided for late binding and not yet dispatched: the engine
    /// decided and the prompt's blocks, so that a call the gateway moves is
    /// indexed where it ran. Bounded by [`PENDING_CAP`].
    pending: HashMap<CallId, (usize, Vec<u64>), BuildU64Hasher>,
}

/// Most calls remembered for late binding; beyond, the memory is cleared
/// (a moved call then leaves the index pointing at the engine decided).
const PENDING_CAP: usize = 65_536;

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
            kv: KvIndex::new(0, 0, 0),
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
            last: DecisionNote::default(),
            pending: HashMap::default(),
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
        f64::from(self.loads.in_flight(engine)).max(self.reported.queued(engine))
    }

    /// Decides where and how urgently a call runs, and counts it as load.
    pub fn decide(&mut self, req: &RouteRequest, now_ms: u64) -> RouteReply {
        self.scratch.clear();
        let serving = self
            .serving
            .iter()
            .find(|(m, _)| *m == req.model)
            .map_or(&self.serving_any, |(_, mask)| mask);
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
            self.kv.overlay(&req.block_hashes, now_ms, &mut self.ratios);
        }
        // Where events flow, the index's answer replaces the freshness estimate.
        let affinity = affinity.map(|mut a| {
            if self.kv.active(a.engine) {
                a.freshness = self.ratios.get(a.engine).copied().unwrap_or(0.0);
            }
            a
        });
        self.turn = self.turn.wrapping_add(1);
        let inputs = Inputs {
            engines: &self.scratch,
            prefix_match: &self.ratios,
            affinity,
            session_hash: req.session_hash,
            turn: self.turn,
        };
        let Some(p) = choose(
            self.knobs.policy.strategy,
            &self.knobs.policy.placement,
            &self.knobs.policy.cache,
            &inputs,
        ) else {
            return RouteReply::NoEngine {
                reason: format!("no healthy engine serves model {:?}", req.model),
            };
        };
        let best_match = self
            .ratios
            .iter()
            .zip(&self.scratch)
            .filter(|(_, e)| e.healthy)
            .map(|(r, _)| *r)
            .fold(0.0, f64::max);
        self.last = DecisionNote {
            had_affinity: session.and_then(|s| s.affinity()),
            engine: p.engine,
            chosen_match: self.ratios.get(p.engine).copied().unwrap_or(0.0),
            best_match,
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
        self.kv.predict(&req.block_hashes, p.engine, now_ms);
        if self.knobs.policy.strategy == Strategy::Tether && !req.block_hashes.is_empty() {
            if self.pending.len() >= PENDING_CAP {
                self.pending.clear();
            }
            self.pending
                .insert(req.call_id, (p.engine, req.block_hashes.clone()));
        }
        // Only Tether's own strategy orders calls and binds them late; the
        // baselines are first come, first served and keep their pick.
        let (level, bind_delay) = if self.knobs.policy.strategy == Strategy::Tether {
            let level = call_level(
                &self.knobs.policy.priority,
                &service,
                req.prompt_tokens,
                req.program,
            );
            // What the cache on the chosen engine saves: the prefix it
            // probably holds, or — placed by affinity without a prefix
            // match — the session's history weighed by its freshness.
            let mut cached = self.ratios.get(p.engine).copied().unwrap_or(0.0);
            if p.reason == RouteReason::Affinity
                && let Some(a) = affinity
            {
                cached = cached.max(a.freshness);
            }
            let saving = self
                .knobs
                .policy
                .cost
                .prefill_saving(cached.clamp(0.0, 1.0) * f64::from(req.prompt_tokens));
            (level, saving)
        } else {
            (0, f64::INFINITY)
        };
        RouteReply::Decision(RouteDecision {
            call_id: req.call_id,
            engine: self.fleet.engines[p.engine].name.clone(),
            level,
            inherited_cst: service.cst,
            service: match self.knobs.policy.priority.mode {
                PriorityMode::Atlas => service.cst,
                PriorityMode::Plas => service.attained,
            },
            bind_delay,
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
            EventKind::Dispatched { .. } => {
                self.loads.start(e.call_id, engine, e.at_ms);
                // Moved by late binding: its prompt's blocks are where it ran.
                if let Some((decided, blocks)) = self.pending.remove(&e.call_id)
                    && decided != engine
                {
                    self.prefix.insert(&blocks, engine);
                    self.kv.predict(&blocks, engine, e.at_ms);
                }
            }
            EventKind::Finished(f) => {
                self.loads.finish(e.call_id);
                self.pending.remove(&e.call_id);
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
