//! The scheduler: a read-optimised replica of every shard's session state and
//! of each engine's load, and the route endpoint answered from it.
//!
//! Module map:
//! - [`config`]  — flags, environment and defaults (including the policy's knobs).
//! - [`replica`] — the session replica: compact records merged by version,
//!   per-shard sequence tracking and gap detection.
//! - [`load`]    — calls in flight per engine, from decisions and request events.
//! - [`prefix`]  — the approximate index of prompt blocks recently placed per engine.
//! - [`kv_index`] — the exact index of the blocks engines hold, from their
//!   KV cache events (`<p>.kv.<engine>`), with predict-on-route.
//! - [`resync`]  — fetching a shard's snapshot, page by page, off the actor.
//! - [`decider`] — the pure decider: feeds the policy from replica, load and
//!   prefix index; no I/O.
//! - [`core`]    — the scheduler actor: one task owns replica and load and
//!   answers route requests, deltas and events in turn (no locks).
//! - [`metrics`] — the Prometheus metrics.
//! - [`service`] — wiring: connect, subscribe, probe engines, serve admin.
#![forbid(unsafe_code)]

pub mod config;
pub mod core;
pub mod decider;
pub mod kv_index;
pub mod load;
pub mod metrics;
pub mod prefix;
pub mod replica;
pub mod resync;
pub mod service;

pub use config::Config;
pub use service::{Running, start, start_with_fleet};
