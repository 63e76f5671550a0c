//! The session-state service: one actor per shard, each owning its shard's
//! sessions (no locks on the hot path).
//!
//! Module map:
//! - [`config`]  — flags, environment and defaults.
//! - [`shards`]  — which shards this process owns (`all` or `0-7,12`).
//! - [`actor`]   — the shard actor: applies events, batches and publishes
//!   sequenced deltas, evicts idle sessions, answers snapshots and queries.
//! - [`intake`]  — where events come from (each shard's durable consumer on
//!   the JetStream events stream, or core NATS in memory-only mode), decoded
//!   and fed to the actors' mailboxes in stream order.
//! - [`snapshot`] — the versioned shard snapshot format.
//! - [`lease`]   — lease-based shard ownership (optional): acquire, renew,
//!   fence, release.
//! - [`responders`] — request-reply endpoints: snapshot pages and session queries.
//! - [`metrics`] — the Prometheus metrics.
//! - [`service`] — wiring: connect, spawn, serve the admin endpoint, shut down.
#![forbid(unsafe_code)]

pub mod actor;
pub mod config;
pub mod intake;
pub mod lease;
pub mod metrics;
pub mod responders;
pub mod service;
pub mod shards;
pub mod snapshot;

pub use config::Config;
pub use service::{Running, start};
/// The session model the shards apply (for tests that compare against it).
pub use tether_session;
