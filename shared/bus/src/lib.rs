//! The NATS bus as Tether's services use it.
//!
//! Module map:
//! - [`args`]    — the bus flags every service shares (NATS URL, credentials, TLS, prefix, shards).
//! - [`connect`] — connect with retry (a service may start before NATS), and
//!   the [`BusStats`] counters fed by the client's events (slow consumers,
//!   disconnects): dropped messages are counted, never ignored.
//! - [`jetstream`] — the durable events stream, shard consumers, the snapshot
//!   store, publishing with a deduplication id.
//! - [`rounds`]  — [`Rounds`]: fair turns for an actor's select over several
//!   inputs (no input waits unboundedly behind a busy one).
//! - [`trace`]   — W3C trace context in NATS headers: inject on send, extract on receive.
//! - [`typed`]   — [`Bus`]: typed publish / request / respond over the protocol codec.
#![forbid(unsafe_code)]

pub mod args;
pub mod connect;
pub mod jetstream;
pub mod rounds;
pub mod trace;
pub mod typed;

pub use args::BusArgs;
pub use async_nats::{self, Client, Message, Subscriber};
pub use connect::{BusAuth, BusConfig, BusStats, ConnectFailure, connect, connect_with};
pub use rounds::Rounds;
pub use trace::{extract_context, follow, inject_context};
pub use typed::{Bus, BusError};
