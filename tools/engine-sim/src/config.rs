//! The simulator's knobs. Defaults model Llama-3-8B (bf16) on one H100 SXM
//! 80 GB under vLLM's V1 engine; `docs/engine-sim.md` gives the source of
//! each. Every knob is a CLI flag with a `TETHER_SIM_*` environment
//! fallback, and a key of the same name in a TOML file.

use clap::{Args, ValueEnum};
use serde::Deserialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchedulingPolicy {
    /// First come, first served (vLLM's default).
    #[default]
    Fcfs,
    /// By the request's `priority` (lower first), FIFO among equals.
    Priority,
}

#[derive(Clone, Debug, Args, Deserialize)]
#[serde(default)]
pub struct SimConfig {
    /// The engine's name, reported in `x-engine-name` and `system_fingerprint`.
    #[arg(long, env = "TETHER_SIM_NAME", default_value = "sim")]
    pub name: String,
    /// Models served (comma-separated); any model is accepted when empty.
    #[arg(
        long,
        env = "TETHER_SIM_MODELS",
        value_delimiter = ',',
        default_value = "tether-sim"
    )]
    pub models: Vec<String>,
    /// Sequences running at once (vLLM `--max-num-seqs`).
    #[arg(long, env = "TETHER_SIM_MAX_NUM_SEQS", default_value_t = 256)]
    pub max_num_seqs: usize,
    /// Tokens per step shared by decode and chunked prefill (vLLM `--max-num-batched-tokens`).
    #[arg(
        long,
        env = "TETHER_SIM_MAX_NUM_BATCHED_TOKENS",
        default_value_t = 8192
    )]
    pub max_num_batched_tokens: usize,
    /// Longest prompt + completion, tokens (vLLM `--max-model-len`).
    #[arg(long, env = "TETHER_SIM_MAX_MODEL_LEN", default_value_t = 131_072)]
    pub max_model_len: usize,
    /// Tokens per KV block (vLLM `--block-size`).
    #[arg(long, env = "TETHER_SIM_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// KV cache capacity, tokens.
    #[arg(long, env = "TETHER_SIM_KV_CACHE_TOKENS", default_value_t = 400_000)]
    pub kv_cache_tokens: usize,
    /// Fixed cost of a step, seconds (reading the weights once).
    #[arg(long, env = "TETHER_SIM_STEP_OVERHEAD", default_value_t = 0.006)]
    pub step_overhead: f64,
    /// Cost per prompt token prefilled in a step, seconds.
    #[arg(
        long,
        env = "TETHER_SIM_PER_PREFILL_TOKEN",
        default_value_t = 0.000_065
    )]
    pub per_prefill_token: f64,
    /// Cost per decoding sequence in a step, seconds.
    #[arg(long, env = "TETHER_SIM_PER_DECODE_SEQ", default_value_t = 0.000_05)]
    pub per_decode_seq: f64,
    /// Cost per token of KV attended to in a step, seconds (KV reads).
    #[arg(
        long,
        env = "TETHER_SIM_PER_CONTEXT_TOKEN",
        default_value_t = 0.000_000_05
    )]
    pub per_context_token: f64,
    /// Waiting-queue policy (vLLM `--scheduling-policy`).
    #[arg(long, env = "TETHER_SIM_SCHEDULING_POLICY", value_enum, default_value_t = SchedulingPolicy::Fcfs)]
    pub scheduling_policy: SchedulingPolicy,
    /// Simulated seconds per wall second (10 runs ten times faster than real).
    #[arg(long, env = "TETHER_SIM_TIME_SCALE", default_value_t = 1.0)]
    pub time_scale: f64,
    /// `max_tokens` when a request gives none (capped by what `max_model_len` leaves).
    #[arg(long, env = "TETHER_SIM_DEFAULT_MAX_TOKENS", default_value_t = 16)]
    pub default_max_tokens: usize,
    /// Publish KV cache events as vLLM does (its `--kv-events-config`
    /// `endpoint`): a ZMQ PUB socket, e.g. `tcp://*:5557`. Off when unset.
    #[arg(long, env = "TETHER_SIM_KV_EVENTS_ENDPOINT")]
    pub kv_events_endpoint: Option<String>,
    /// ZMQ ROUTER socket answering replay requests for missed event batches
    /// (vLLM's `replay_endpoint`), e.g. `tcp://*:5558`. Off when unset.
    #[arg(long, env = "TETHER_SIM_KV_EVENTS_REPLAY_ENDPOINT")]
    pub kv_events_replay_endpoint: Option<String>,
    /// The topic frame of every event message (vLLM's `topic`).
    #[arg(long, env = "TETHER_SIM_KV_EVENTS_TOPIC", default_value = "")]
    pub kv_events_topic: String,
    /// Batches kept for replay (vLLM's `buffer_steps`).
    #[arg(
        long,
        env = "TETHER_SIM_KV_EVENTS_BUFFER_STEPS",
        default_value_t = 10_000
    )]
    pub kv_events_buffer_steps: usize,
    /// How events are laid out: `array` (tagged positional arrays, vLLM
    /// before its map layout) or `map` (tagged maps with field names).
    #[arg(long, env = "TETHER_SIM_KV_EVENTS_FORMAT", value_enum, default_value_t = KvEventsFormat::Array)]
    pub kv_events_format: KvEventsFormat,
}

/// The layout of each KV cache event on the wire; the batch around them is
/// always a positional array `[ts, events, data_parallel_rank]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KvEventsFormat {
    /// `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name]`.
    #[default]
    Array,
    /// `{"type": "BlockStored", "block_hashes": …, …}`.
    Map,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            name: "sim".into(),
            models: vec!["tether-sim".into()],
            max_num_seqs: 256,
            max_num_batched_tokens: 8192,
            max_model_len: 131_072,
            block_size: 16,
            kv_cache_tokens: 400_000,
            step_overhead: 0.006,
            per_prefill_token: 0.000_065,
            per_decode_seq: 0.000_05,
            per_context_token: 0.000_000_05,
            scheduling_policy: SchedulingPolicy::Fcfs,
            time_scale: 1.0,
            default_max_tokens: 16,
            kv_events_endpoint: None,
            kv_events_replay_endpoint: None,
            kv_events_topic: String::new(),
            kv_events_buffer_steps: 10_000,
            kv_events_format: KvEventsFormat::Array,
        }
    }
}

/// A configuration the simulator cannot run with.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("{0} must be a finite number >= 0")]
    Negative(&'static str),
    #[error("time_scale must be a finite number > 0")]
    TimeScale,
    #[error("kv_cache_tokens ({kv}) holds no block of {block} tokens")]
    NoBlocks { kv: usize, block: usize },
}

impl SimConfig {
    /// The defaults, under a name.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }

    /// Whether a request for `model` is served here.
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }

    /// The model a request that names none gets: the first served.
    pub fn default_model(&self) -> &str {
        self.models.first().map_or("tether-sim", String::as_str)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, v) in [
            ("max_num_seqs", self.max_num_seqs),
            ("max_num_batched_tokens", self.max_num_batched_tokens),
            ("max_model_len", self.max_model_len),
            ("block_size", self.block_size),
        ] {
            if v == 0 {
                return Err(ConfigError::Zero(name));
            }
        }
        for (name, v) in [
            ("step_overhead", self.step_overhead),
            ("per_prefill_token", self.per_prefill_token),
            ("per_decode_seq", self.per_decode_seq),
            ("per_context_token", self.per_context_token),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ConfigError::Negative(name));
            }
        }
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return Err(ConfigError::TimeScale);
        }
        if self.kv_cache_tokens < self.block_size {
            return Err(ConfigError::NoBlocks {
                kv: self.kv_cache_tokens,
                block: self.block_size,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        sim: SimConfig,
    }

    /// The clap defaults and `Default` must agree.
    #[test]
    fn flag_defaults_are_the_documented_defaults() {
        let parsed = Cli::parse_from(["sim"]).sim;
        let d = SimConfig::default();
        assert_eq!(format!("{parsed:?}"), format!("{d:?}"));
        assert_eq!(d.validate(), Ok(()));
    }

    #[test]
    fn toml_fills_what_it_names() {
        let cfg: SimConfig = toml::from_str(
            "name = \"sim-9\"\nscheduling_policy = \"priority\"\nstep_overhead = 0.01",
        )
        .unwrap();
        assert_eq!(cfg.name, "sim-9");
        assert_eq!(cfg.scheduling_policy, SchedulingPolicy::Priority);
        assert_eq!(cfg.step_overhead, 0.01);
        assert_eq!(cfg.block_size, 16);
    }

    #[test]
    fn bad_values_are_refused() {
        let bad = |f: fn(&mut SimConfig)| {
            let mut c = SimConfig::default();
            f(&mut c);
            c.validate().is_err()
        };
        assert!(bad(|c| c.block_size = 0));
        assert!(bad(|c| c.time_scale = 0.0));
        assert!(bad(|c| c.per_decode_seq = -1.0));
        assert!(bad(|c| c.kv_cache_tokens = 8));
    }
}
