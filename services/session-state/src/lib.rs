//! The session-state service: one actor per shard, each owning its shard's
//! sessions (no locks on the hot path).
//!
//! Module map:
//! - [`config`]  — flags, environment and defaults.
//! - [`shards`]  — which shards this process owns (`all` or `0-7,12`).
//! - [`actor`]   — the shard actor: applies events, batches and publishes
//!   sequenced deltas, evicts idle sessions, answers snapshots and queries.
//! - [`intake`]  — where events come from (core NATS today), decoded and fed
//!   to the actors' mailboxes. The only module that would change to source
//!   events from a JetStream stream and replay them after a restart.
//! - [`responders`] — request-reply endpoints: snapshot pages and session queries.
//! - [`metrics`] — the Prometheus metrics.
//! - [`service`] — wiring: connect, spawn, serve the admin endpoint, shut down.
#![forbid(unsafe_code)]

pub mod actor;
pub mod config;
pub mod intake;
pub mod metrics;
pub mod responders;
pub mod service;
pub mod shards;

pub use config::Config;
pub use service::{Running, start};
