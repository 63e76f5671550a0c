//! The configuration: the command line, also built in code by harnesses
//! (every struct has a `Default` equal to the command line's defaults).
//!
//! Flags of [`Common`] are global: they may come before or after the
//! workload's subcommand.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

use crate::plan::Pacing;

pub const DEFAULT_BASE_URL: &str = "http://127.0.0.1:8080";
pub const DEFAULT_MODEL: &str = "tether-sim";
pub const DEFAULT_SESSION_HEADER: &str = "x-session-id";
pub const DEFAULT_CONCURRENCY_LIMIT: usize = 4096;

/// Everything a run needs: the shared flags and the workload.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "tether-loadgen",
    version,
    about = "Replays session workloads against an OpenAI-compatible endpoint and records latencies"
)]
pub struct LoadgenConfig {
    #[command(flatten)]
    pub common: Common,
    #[command(subcommand)]
    pub workload: Workload,
}

impl LoadgenConfig {
    /// The workload with every shared flag at its default.
    pub fn new(workload: Workload) -> Self {
        Self {
            common: Common::default(),
            workload,
        }
    }
}

/// Flags shared by every workload.
#[derive(Clone, Debug, Args)]
#[command(next_help_heading = "Shared options")]
pub struct Common {
    /// Base URL of the endpoint (Tether's ingress, another router, an engine).
    #[arg(long, global = true, env = "TETHER_LOADGEN_BASE_URL", default_value = DEFAULT_BASE_URL)]
    pub base_url: String,
    /// The `model` of every request.
    #[arg(long, global = true, default_value = DEFAULT_MODEL)]
    pub model: String,
    /// Request header that carries the session id.
    #[arg(long, global = true, default_value = DEFAULT_SESSION_HEADER)]
    pub session_header: String,
    /// More request headers (comma-separated) that carry the session id
    /// too, e.g. `x-claude-code-session-id`, which agents send and by
    /// which a router may tell agent programs from chats.
    #[arg(long, global = true, value_delimiter = ',')]
    pub extra_session_headers: Vec<String>,
    /// Directory for calls.jsonl, sessions.jsonl and summary.json.
    #[arg(long, global = true)]
    pub out: Option<PathBuf>,
    /// Simulated seconds per wall second, as the engines run (engine-sim's
    /// `--time-scale`): every wait is divided by it, every measured latency
    /// multiplied by it.
    #[arg(long, global = true, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Most calls in flight at once (a safety cap; calls over it wait).
    #[arg(long, global = true, default_value_t = DEFAULT_CONCURRENCY_LIMIT)]
    pub concurrency_limit: usize,
    /// Stop sending after this many calls (0: no limit). Mooncake: the
    /// first N requests of the trace.
    #[arg(long, global = true, default_value_t = 0)]
    pub max_requests: usize,
    /// Stop sending new calls after this many simulated seconds; calls in
    /// flight are awaited.
    #[arg(long, global = true)]
    pub duration_secs: Option<f64>,
    /// Give up on a call after this many simulated seconds (an error).
    #[arg(long, global = true)]
    pub request_timeout_secs: Option<f64>,
    /// Engine base URLs (comma-separated) whose `/metrics` prefix-cache
    /// counters give the run's fleet hit rate.
    #[arg(long, global = true, value_delimiter = ',')]
    pub engine_metrics: Vec<String>,
    /// A name for the run, copied into the summary.
    #[arg(long, global = true, default_value = "run")]
    pub label: String,
}

impl Default for Common {
    fn default() -> Self {
        Self {
            base_url: DEFAULT_BASE_URL.to_owned(),
            model: DEFAULT_MODEL.to_owned(),
            session_header: DEFAULT_SESSION_HEADER.to_owned(),
            extra_session_headers: Vec::new(),
            out: None,
            time_scale: 1.0,
            concurrency_limit: DEFAULT_CONCURRENCY_LIMIT,
            max_requests: 0,
            duration_secs: None,
            request_timeout_secs: None,
            engine_metrics: Vec::new(),
            label: "run".to_owned(),
        }
    }
}

#[derive(Clone, Debug, Subcommand)]
pub enum Workload {
    /// A Mooncake-format trace (JSON Lines: timestamp, input_length, output_length, hash_ids).
    Mooncake(MooncakeArgs),
    /// Multi-turn chat sessions with a growing history.
    Chat(ChatArgs),
    /// Agent programs: steps that fan out into parallel calls and join.
    Agent(AgentArgs),
}

impl Workload {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Mooncake(_) => "mooncake",
            Self::Chat(_) => "chat",
            Self::Agent(_) => "agent",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum PacingArg {
    /// Each turn after the previous answer plus think time.
    #[default]
    Closed,
    /// Each request at its trace timestamp.
    Open,
}

/// How trace requests are grouped into sessions (docs/loadgen.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum SessionRule {
    /// Later turn of the earlier request sharing the longest common prefix.
    #[default]
    LongestPrefix,
    /// Later turn only of an earlier request whose whole id list it begins with.
    WholePrefix,
}

#[derive(Clone, Debug, Args)]
pub struct MooncakeArgs {
    /// The JSONL trace.
    #[arg(long)]
    pub trace: PathBuf,
    /// Arrival mode.
    #[arg(long, value_enum, conflicts_with_all = ["open_loop", "closed_loop"])]
    pub pacing: Option<PacingArg>,
    /// Every request at its own trace timestamp ÷ speedup (= `--pacing open`).
    #[arg(long, conflicts_with = "closed_loop")]
    pub open_loop: bool,
    /// Turns after the previous answer plus think time (= `--pacing closed`, the default).
    #[arg(long)]
    pub closed_loop: bool,
    /// Trace time runs this much faster (arrivals and gaps divided by it).
    #[arg(long, default_value_t = 1.0)]
    pub speedup: f64,
    /// Closed loop: think-time cap, seconds.
    #[arg(long, alias = "max-think", default_value_t = 3.0)]
    pub max_think_secs: f64,
    /// How requests are grouped into sessions.
    #[arg(long, value_enum, default_value_t = SessionRule::LongestPrefix)]
    pub session_rule: SessionRule,
    /// Fewest shared leading blocks that make a request a later turn.
    #[arg(long, default_value_t = 1)]
    pub min_shared_blocks: usize,
}

impl MooncakeArgs {
    pub fn new(trace: impl Into<PathBuf>) -> Self {
        Self {
            trace: trace.into(),
            pacing: None,
            open_loop: false,
            closed_loop: false,
            speedup: 1.0,
            max_think_secs: 3.0,
            session_rule: SessionRule::LongestPrefix,
            min_shared_blocks: 1,
        }
    }

    pub fn pacing(&self) -> Pacing {
        if self.open_loop || self.pacing == Some(PacingArg::Open) {
            Pacing::Open
        } else {
            Pacing::Closed
        }
    }
}

/// Shared by `chat` and `agent`.
#[derive(Clone, Debug, Args)]
pub struct SynthArgs {
    /// Sessions in the run.
    #[arg(long, default_value_t = 20)]
    pub sessions: usize,
    /// Session arrivals per second (Poisson).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Words of each new user message: min.
    #[arg(long, default_value_t = 50)]
    pub prompt_min: u64,
    /// Words of each new user message: max.
    #[arg(long, default_value_t = 400)]
    pub prompt_max: u64,
    /// Tokens of each answer (`max_tokens`): min.
    #[arg(long, default_value_t = 16)]
    pub answer_min: u64,
    /// Tokens of each answer (`max_tokens`): max.
    #[arg(long, default_value_t = 256)]
    pub answer_max: u64,
}

impl Default for SynthArgs {
    fn default() -> Self {
        Self {
            sessions: 20,
            rate: 1.0,
            seed: 1,
            prompt_min: 50,
            prompt_max: 400,
            answer_min: 16,
            answer_max: 256,
        }
    }
}

#[derive(Clone, Debug, Args)]
pub struct ChatArgs {
    #[command(flatten)]
    pub synth: SynthArgs,
    /// Turns per session.
    #[arg(long, default_value_t = 5)]
    pub turns: usize,
    /// Seconds between an answer and the next turn.
    #[arg(long, alias = "think", default_value_t = 2.0)]
    pub think_secs: f64,
}

impl Default for ChatArgs {
    fn default() -> Self {
        Self {
            synth: SynthArgs::default(),
            turns: 5,
            think_secs: 2.0,
        }
    }
}

/// How many steps an agent program has.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum StepDist {
    /// 1..=steps, bounded Pareto (α = 1.2): most programs short, a few long.
    #[default]
    Pareto,
    /// Exactly `steps`.
    Fixed,
}

#[derive(Clone, Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub synth: SynthArgs,
    /// Steps per program (the most, with `--step-dist pareto`).
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Parallel calls per step (the most, with `--fanout-min`).
    #[arg(long, default_value_t = 4)]
    pub fanout: usize,
    /// Fewest parallel calls per step: each step's fan-out is drawn
    /// uniformly from `fanout-min..=fanout` (0: always `--fanout`).
    #[arg(long, default_value_t = 0)]
    pub fanout_min: usize,
    /// Distribution of the number of steps.
    #[arg(long, value_enum, default_value_t = StepDist::Pareto)]
    pub step_dist: StepDist,
    /// Shape α of the bounded Pareto step count (smaller: heavier tail).
    #[arg(long, default_value_t = 1.2)]
    pub step_alpha: f64,
    /// Seconds between a step's join and the next step.
    #[arg(long, default_value_t = 0.0)]
    pub think_secs: f64,
    /// Mean of a random tool-call pause added between a step's join and the
    /// next step, simulated seconds (exponential; 0: none).
    #[arg(long, default_value_t = 0.0)]
    pub tool_pause_secs: f64,
    /// Cap on one tool-call pause, simulated seconds.
    #[arg(long, default_value_t = 60.0)]
    pub tool_pause_max_secs: f64,
    /// Size of a pool of shared system prompts (0: none): each program
    /// opens with one of them, chosen uniformly, so many programs share a
    /// long prefix.
    #[arg(long, default_value_t = 0)]
    pub system_prompts: usize,
    /// Words of each shared system prompt.
    #[arg(long, default_value_t = 2000)]
    pub system_prompt_words: u64,
}

impl Default for AgentArgs {
    fn default() -> Self {
        Self {
            synth: SynthArgs::default(),
            steps: 4,
            fanout: 4,
            fanout_min: 0,
            step_dist: StepDist::Pareto,
            step_alpha: 1.2,
            think_secs: 0.0,
            tool_pause_secs: 0.0,
            tool_pause_max_secs: 60.0,
            system_prompts: 0,
            system_prompt_words: 2000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> LoadgenConfig {
        LoadgenConfig::try_parse_from(args).unwrap()
    }

    #[test]
    fn defaults_match_the_command_line() {
        let c = parse(&["tether-loadgen", "chat"]);
        let d = Common::default();
        assert_eq!(c.common.base_url, d.base_url);
        assert_eq!(c.common.model, d.model);
        assert_eq!(c.common.concurrency_limit, d.concurrency_limit);
        let Workload::Chat(chat) = c.workload else {
            panic!("chat")
        };
        let dc = ChatArgs::default();
        assert_eq!(
            (
                chat.turns,
                chat.think_secs,
                chat.synth.sessions,
                chat.synth.seed
            ),
            (dc.turns, dc.think_secs, dc.synth.sessions, dc.synth.seed)
        );
        let Workload::Agent(a) = parse(&["x", "agent"]).workload else {
            panic!("agent")
        };
        assert_eq!((a.steps, a.fanout, a.step_dist), (4, 4, StepDist::Pareto));
        let d = AgentArgs::default();
        assert_eq!(
            (
                a.fanout_min,
                a.step_alpha,
                a.tool_pause_secs,
                a.tool_pause_max_secs
            ),
            (
                d.fanout_min,
                d.step_alpha,
                d.tool_pause_secs,
                d.tool_pause_max_secs
            )
        );
        assert_eq!(
            (a.system_prompts, a.system_prompt_words),
            (d.system_prompts, d.system_prompt_words)
        );
    }

    #[test]
    fn pacing_flags_and_global_flags() {
        let c = parse(&[
            "x",
            "--concurrency-limit",
            "1",
            "mooncake",
            "--trace",
            "t.jsonl",
            "--pacing",
            "open",
            "--max-think",
            "3",
            "--max-requests",
            "100",
        ]);
        assert_eq!(
            (c.common.concurrency_limit, c.common.max_requests),
            (1, 100)
        );
        let Workload::Mooncake(m) = c.workload else {
            panic!("mooncake")
        };
        assert_eq!(m.pacing(), Pacing::Open);
        assert_eq!(m.max_think_secs, 3.0);
        let m = |extra: &[&str]| {
            let mut args = vec!["x", "mooncake", "--trace", "t"];
            args.extend_from_slice(extra);
            match LoadgenConfig::try_parse_from(args).map(|c| c.workload) {
                Ok(Workload::Mooncake(m)) => Ok(m.pacing()),
                Ok(_) => panic!("mooncake"),
                Err(e) => Err(e.kind()),
            }
        };
        assert_eq!(m(&[]), Ok(Pacing::Closed));
        assert_eq!(m(&["--open-loop"]), Ok(Pacing::Open));
        assert_eq!(m(&["--closed-loop"]), Ok(Pacing::Closed));
        assert!(m(&["--open-loop", "--closed-loop"]).is_err());
        assert!(m(&["--open-loop", "--pacing", "closed"]).is_err());
    }
}
