//! tether-loadgen: replays session workloads against any OpenAI-compatible
//! base URL — Tether's ingress, another router, or an engine — with streaming
//! requests, and records time to first token, time per output token,
//! end-to-end latency and session completion time. `docs/loadgen.md`
//! documents the workloads and the outputs.
//!
//! Module map:
//! - [`config`]   — the command line.
//! - [`rng`]      — a small seeded generator (reproducible workloads).
//! - [`plan`]     — a workload as sessions of steps of calls, in simulated time.
//! - [`mooncake`] — Mooncake traces: parsing, session reconstruction, prompt synthesis.
//! - [`synth`]    — synthetic chat and agent workloads.
//! - [`client`]   — one streamed call and its timings.
//! - [`report`]   — records, percentiles, the summary, engine cache counters.
//! - [`run`]      — driving a plan in (scaled) real time.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod mooncake;
pub mod plan;
pub mod report;
pub mod rng;
pub mod run;
pub mod synth;

pub use config::{Cli, Common, Workload};
pub use report::Summary;
pub use run::run;
