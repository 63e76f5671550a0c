//! `tether-kv-events`: follows each engine's KV cache events (vLLM's ZMQ
//! publisher, `--kv-events-config`) and relays them on NATS as
//! [`tether_protocol::KvEventBatch`]es on `<prefix>.kv.<engine>`, replaying
//! gaps from the engine's replay socket, resetting the engine when it
//! cannot. `docs/protocol.md` documents the subject.
//!
//! Module map:
//! - [`config`]  — flags, environment and defaults.
//! - [`wire`]    — vLLM's msgpack event batches, decoded.
//! - [`relay`]   — one engine's stream: sequence checks, replay, relay.
//! - [`metrics`] — the Prometheus metrics.
//! - [`service`] — wiring: read the fleet, connect, start a relay per engine.
#![forbid(unsafe_code)]

pub mod config;
pub mod metrics;
pub mod relay;
pub mod service;
pub mod wire;

pub use config::Config;
pub use service::{Running, start, start_with_fleet};
