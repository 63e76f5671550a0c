//! engine-sim: an OpenAI-compatible simulated LLM engine that behaves like
//! vLLM where it matters for scheduling, so Tether runs, is tested and is
//! benchmarked without GPUs. `docs/engine-sim.md` documents the model.
//!
//! Module map:
//! - [`config`]  — every knob, with its default and its source.
//! - [`tokens`]  — deterministic tokenisation, block hashes, generated text.
//! - [`kv`]      — the prefix KV cache: hashed blocks, pins, LRU eviction.
//! - [`kv_events`] — the cache's events over ZMQ as vLLM publishes them,
//!   with the replay socket.
//! - [`engine`]  — the scheduler and step loop as a pure state machine
//!   (simulated time is data): continuous batching, chunked prefill,
//!   FCFS or priority, preemption.
//! - [`actor`]   — the task that runs the engine in (scaled) real time.
//! - [`metrics`] — vLLM-named Prometheus metrics, per served instance.
//! - [`openai`]  — the OpenAI wire format: request parsing, the chat
//!   template, response, chunk and error JSON.
//! - [`http`]    — the HTTP surface: routes, SSE streaming, `serve`.
#![forbid(unsafe_code)]

pub mod actor;
pub mod config;
pub mod engine;
pub mod http;
pub mod kv;
pub mod kv_events;
pub mod metrics;
pub mod openai;
pub mod tokens;

pub use config::{ConfigError, KvEventsFormat, SchedulingPolicy, SimConfig};
pub use http::serve;
