//! The simulator's knobs. Defaults model Llama-3-8B (bf16) on one H100 80 GB
//! under vLLM's V1 engine; `docs/engine-sim.md` gives the source of each.

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
    #[arg(long, env = "TETHER_SIM_STEP_OVERHEAD", default_value_t = 0.005)]
    pub step_overhead: f64,
    /// Cost per prompt token prefilled in a step, seconds.
    #[arg(long, env = "TETHER_SIM_PER_PREFILL_TOKEN", default_value_t = 0.000_05)]
    pub per_prefill_token: f64,
    /// Cost per decoding sequence in a step, seconds.
    #[arg(long, env = "TETHER_SIM_PER_DECODE_SEQ", default_value_t = 0.000_1)]
    pub per_decode_seq: f64,
    /// Cost per token of context held by running sequences, seconds (KV reads).
    #[arg(
        long,
        env = "TETHER_SIM_PER_CONTEXT_TOKEN",
        default_value_t = 0.000_000_04
    )]
    pub per_context_token: f64,
    /// Waiting-queue policy (vLLM `--scheduling-policy`).
    #[arg(long, env = "TETHER_SIM_SCHEDULING_POLICY", value_enum, default_value_t = SchedulingPolicy::Fcfs)]
    pub scheduling_policy: SchedulingPolicy,
    /// Simulated seconds per wall second (10 runs ten times faster than real).
    #[arg(long, env = "TETHER_SIM_TIME_SCALE", default_value_t = 1.0)]
    pub time_scale: f64,
    /// `max_tokens` when a request gives none.
    #[arg(long, env = "TETHER_SIM_DEFAULT_MAX_TOKENS", default_value_t = 16)]
    pub default_max_tokens: usize,
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
            step_overhead: 0.005,
            per_prefill_token: 0.000_05,
            per_decode_seq: 0.000_1,
            per_context_token: 0.000_000_04,
            scheduling_policy: SchedulingPolicy::Fcfs,
            time_scale: 1.0,
            default_max_tokens: 16,
        }
    }
}

impl SimConfig {
    /// The defaults, under a name.
    pub fn named(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            ..Self::default()
        }
    }

    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|m| m == model)
    }
}
