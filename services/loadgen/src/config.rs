//! The command line.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "tether-loadgen",
    version,
    about = "Replays session workloads against an OpenAI-compatible endpoint"
)]
pub struct Cli {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub workload: Workload,
}

#[derive(Clone, Debug, Args)]
pub struct Common {
    /// Base URL of the endpoint (Tether's ingress, another router, an engine).
    #[arg(
        long,
        env = "TETHER_LOADGEN_BASE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub base_url: String,
    #[arg(long, default_value = "tether-sim")]
    pub model: String,
    /// Header that carries the session id.
    #[arg(long, default_value = "x-session-id")]
    pub session_header: String,
    /// Where to write calls.jsonl, sessions.jsonl and summary.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Simulated seconds per wall second, as the engines run (`--time-scale`
    /// on engine-sim): waits are divided by it, measured latencies multiplied.
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Most calls in flight at once (a safety cap).
    #[arg(long, default_value_t = 4096)]
    pub concurrency_limit: usize,
    /// Engine base URLs whose prefix-cache counters give the run's hit rate.
    #[arg(long, value_delimiter = ',')]
    pub engine_metrics: Vec<String>,
    /// A name for the run, copied into the summary.
    #[arg(long, default_value = "run")]
    pub label: String,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum PacingArg {
    /// Each turn after the previous answer plus think time.
    Closed,
    /// Each request at its trace timestamp.
    Open,
}

#[derive(Clone, Debug, Subcommand)]
pub enum Workload {
    /// A Mooncake-format trace (JSON Lines: timestamp, input_length, output_length, hash_ids).
    Mooncake {
        #[arg(long)]
        trace: PathBuf,
        #[arg(long, value_enum, default_value_t = PacingArg::Closed)]
        pacing: PacingArg,
        /// Trace time runs this much faster (arrivals and gaps divided by it).
        #[arg(long, default_value_t = 1.0)]
        speedup: f64,
        /// Closed loop: think time cap, seconds.
        #[arg(long, default_value_t = 3.0)]
        max_think: f64,
        /// Only the first N requests of the trace (0: all).
        #[arg(long, default_value_t = 0)]
        max_requests: usize,
    },
    /// Multi-turn chat sessions with a growing history.
    Chat {
        #[command(flatten)]
        synth: SynthArgs,
        #[arg(long, default_value_t = 5)]
        turns: usize,
        /// Seconds between an answer and the next turn.
        #[arg(long, default_value_t = 2.0)]
        think: f64,
    },
    /// Agent programs: steps that fan out into parallel calls and join.
    Agent {
        #[command(flatten)]
        synth: SynthArgs,
        #[arg(long, default_value_t = 4)]
        steps: usize,
        #[arg(long, default_value_t = 4)]
        fanout: usize,
    },
}

#[derive(Clone, Debug, Args)]
pub struct SynthArgs {
    #[arg(long, default_value_t = 20)]
    pub sessions: usize,
    /// Session arrivals per second (Poisson).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Words of each new user message: min.
    #[arg(long, default_value_t = 50)]
    pub prompt_min: u64,
    #[arg(long, default_value_t = 400)]
    pub prompt_max: u64,
    /// Tokens of each answer: min.
    #[arg(long, default_value_t = 16)]
    pub answer_min: u64,
    #[arg(long, default_value_t = 256)]
    pub answer_max: u64,
}
