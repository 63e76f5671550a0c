//! Configuration. Every knob is a flag with an environment fallback and a
//! default; `--config file.toml` supplies the rest.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;
use tether_policy::{
    CacheAwareConfig, CostModel, Ordering, PlacementConfig, PolicyConfig, PriorityConfig,
    PriorityMode, Strategy,
};

#[derive(Clone, Debug, Parser)]
#[command(
    name = "tether-scheduler",
    version,
    about = "Tether's scheduler: routes calls from an in-memory replica",
    args_override_self = true
)]
pub struct Config {
    /// Optional TOML file with values for any of these flags.
    #[arg(long, env = "TETHER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub bus: tether_bus::BusArgs,
    /// The fleet file (engines: name, url, models, capabilities).
    #[arg(long, env = "TETHER_FLEET", default_value = "deploy/local/fleet.toml")]
    pub fleet: PathBuf,
    /// Address of the admin endpoint (/metrics, /health, /ready).
    #[arg(long, env = "TETHER_ADMIN_LISTEN", default_value = "127.0.0.1:9103")]
    pub admin_listen: SocketAddr,
    /// Interval of the engines' metrics scrape (load signal and health), ms.
    #[arg(long, env = "TETHER_SCRAPE_INTERVAL_MS", default_value_t = 100)]
    pub scrape_interval_ms: u64,
    /// Routing strategy: tether, cache-aware, least-loaded, session-hash or round-robin.
    #[arg(long, env = "TETHER_STRATEGY", default_value = "tether", value_parser = Strategy::parse)]
    pub strategy: Strategy,
    /// cache-aware and tether: the fleet is imbalanced when max − min load
    /// exceeds this … (64: sglang-router's and vllm-router's default)
    #[arg(long, env = "TETHER_CACHE_BALANCE_ABS", default_value_t = 64.0)]
    pub cache_balance_abs: f64,
    /// … and max exceeds this times min.
    #[arg(long, env = "TETHER_CACHE_BALANCE_REL", default_value_t = 1.5)]
    pub cache_balance_rel: f64,
    /// A prefix match counts when it covers more than this share of the prompt.
    #[arg(long, env = "TETHER_CACHE_MATCH_THRESHOLD", default_value_t = 0.3)]
    pub cache_match_threshold: f64,
    /// Prompt blocks held by the prefix index (LRU).
    #[arg(long, env = "TETHER_PREFIX_INDEX_BLOCKS", default_value_t = 1_000_000)]
    pub prefix_index_blocks: usize,
    /// Which prefix index places calls: `exact` (the engines' own KV cache
    /// events, `<p>.kv.<engine>`, for the engines whose events flow; the
    /// approximate index for the rest) or `approximate` (blocks placed,
    /// never what engines evicted). `exact` needs route requests to carry
    /// the engines' own block hashes.
    #[arg(long, env = "TETHER_PREFIX_SOURCE", default_value = "approximate", value_parser = ["approximate", "exact"])]
    pub prefix_source: String,
    /// Blocks held by the exact index (41–82 bytes each).
    #[arg(long, env = "TETHER_KV_INDEX_BLOCKS", default_value_t = 1_000_000)]
    pub kv_index_blocks: usize,
    /// How long a block predicted on route counts before its engine reports
    /// it stored, ms.
    #[arg(long, env = "TETHER_KV_PROVISIONAL_MS", default_value_t = 2000)]
    pub kv_provisional_ms: u64,
    /// Session records per snapshot page when resynchronising.
    #[arg(long, env = "TETHER_SNAPSHOT_PAGE", default_value_t = 5000)]
    pub snapshot_page: u32,
    /// A call with no end event after this many seconds no longer counts as load.
    #[arg(long, env = "TETHER_CALL_TIMEOUT_SECS", default_value_t = 3600)]
    pub call_timeout_secs: u64,
    /// Priority measure: `atlas` (critical-path service) or `plas` (total service).
    #[arg(long, env = "TETHER_PRIORITY_MODE", default_value = "atlas", value_parser = parse_mode)]
    pub priority_mode: PriorityMode,
    /// Ascending level boundaries in estimated seconds of service.
    #[arg(
        long,
        env = "TETHER_LEVEL_THRESHOLDS",
        value_delimiter = ',',
        default_value = "1,4,16,64"
    )]
    pub level_thresholds: Vec<f64>,
    /// Which calls the levels order: `programs` (sessions with parallel calls
    /// or a program header; every other call is level 0, first come first
    /// served), `all` (every session by attained service) or `fcfs` (none).
    #[arg(long, env = "TETHER_ORDERING", default_value = "programs", value_parser = Ordering::parse)]
    pub ordering: Ordering,
    /// The session's anti-starvation β: a call of a session whose accumulated
    /// wait / max(service, floor) ≥ β is level 0 (0 disables).
    #[arg(long, env = "TETHER_SESSION_STARVATION_RATIO", default_value_t = 2.0)]
    pub session_starvation_ratio: f64,
    /// Seconds of service each prompt token adds to a call's level (0 disables; 0.0001 matches the ingress's prefill cost).
    #[arg(long, env = "TETHER_LEVEL_PROMPT_COST", default_value_t = 0.0)]
    pub level_prompt_cost: f64,
    /// The service floor of the starvation ratio, seconds.
    #[arg(long, env = "TETHER_SERVICE_FLOOR", default_value_t = 1.0)]
    pub service_floor: f64,
    /// Bounded load ε: an affinity engine may carry up to (1+ε)·mean + slack calls.
    #[arg(long, env = "TETHER_BALANCE_EPSILON", default_value_t = 0.5)]
    pub balance_epsilon: f64,
    /// Bounded load absolute slack, calls.
    #[arg(long, env = "TETHER_BALANCE_SLACK", default_value_t = 4.0)]
    pub balance_slack: f64,
    /// Prefill cost of one prompt token, seconds: prices what a cache hit
    /// saves, i.e. how long a call waits for its engine (late binding).
    /// Keep it equal to the ingress's `--cost-prefill-per-token`.
    #[arg(long, env = "TETHER_COST_PREFILL_PER_TOKEN", default_value_t = 0.0001)]
    pub cost_prefill_per_token: f64,
}

fn parse_mode(s: &str) -> Result<PriorityMode, String> {
    match s.to_ascii_lowercase().as_str() {
        "atlas" => Ok(PriorityMode::Atlas),
        "plas" => Ok(PriorityMode::Plas),
        other => Err(format!("unknown priority mode {other:?}: atlas or plas")),
    }
}

impl Config {
    pub fn priority(&self) -> PriorityConfig {
        let mut thresholds: Vec<f64> = self
            .level_thresholds
            .iter()
            .copied()
            .filter(|t| t.is_finite())
            .collect();
        thresholds.sort_by(f64::total_cmp);
        PriorityConfig {
            mode: self.priority_mode,
            ordering: self.ordering,
            thresholds,
            session_starvation_ratio: self.session_starvation_ratio,
            service_floor: self.service_floor,
            prompt_cost: self.level_prompt_cost,
        }
    }

    pub fn knobs(&self) -> crate::decider::PolicyKnobs {
        crate::decider::PolicyKnobs {
            policy: PolicyConfig {
                strategy: self.strategy,
                priority: self.priority(),
                placement: self.placement(),
                cache: CacheAwareConfig {
                    balance_abs: self.cache_balance_abs,
                    balance_rel: self.cache_balance_rel,
                    match_threshold: self.cache_match_threshold,
                },
                cost: CostModel {
                    prefill_per_token: self.cost_prefill_per_token,
                    ..CostModel::default()
                },
                ..PolicyConfig::default()
            },
            prefix_blocks: self.prefix_index_blocks,
        }
    }

    pub fn placement(&self) -> PlacementConfig {
        PlacementConfig {
            epsilon: self.balance_epsilon,
            slack: self.balance_slack,
        }
    }
}
