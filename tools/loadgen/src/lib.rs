//! tether-loadgen: replays session workloads against any OpenAI-compatible
//! base URL — Tether's ingress, another router, or an engine — with streamed
//! chat completions, and records time to first token, time per output
//! token, end-to-end latency per call and completion time per session.
//! `docs/loadgen.md` documents the workloads, the flags and the outputs.
//!
//! In-process use: build a [`LoadgenConfig`] (or parse one) and call
//! [`run()`]; it returns the [`Summary`] and, with `out` set, writes the
//! records.
//!
//! Module map:
//! - [`config`]   — the configuration / command line.
//! - [`rng`]      — SplitMix64, the seeded generator behind every random choice.
//! - [`plan`]     — a workload as sessions of steps of calls, in simulated time.
//! - [`prompt`]   — prompt text from a trace's block hash ids.
//! - [`mooncake`] — Mooncake traces: parsing, session reconstruction, the plan.
//! - [`synth`]    — synthetic chat and agent workloads.
//! - [`sse`]      — server-sent events framing.
//! - [`chunk`]    — what a chat completion stream says (first token, usage, `[DONE]`).
//! - [`client`]   — one streamed call over hyper and its record.
//! - [`gate`]     — request budget, deadline and stop.
//! - [`mod@run`]  — driving a plan in (scaled) real time.
//! - [`stats`]    — means and percentiles.
//! - [`metrics`]  — the engines' prefix-cache counters (Prometheus text).
//! - [`report`]   — session records, the summary, the output files.
#![forbid(unsafe_code)]

pub mod chunk;
pub mod client;
pub mod config;
pub mod gate;
pub mod metrics;
pub mod mooncake;
pub mod plan;
pub mod prompt;
pub mod report;
pub mod rng;
pub mod run;
pub mod sse;
pub mod stats;
pub mod synth;

pub use client::CallRecord;
pub use config::{
    AgentArgs, ChatArgs, Common, LoadgenConfig, MooncakeArgs, PacingArg, SessionRule, StepDist,
    SynthArgs, Workload,
};
pub use report::{SessionRecord, Summary};
pub use run::{plan_of, run, run_until};
pub use stats::Dist;
