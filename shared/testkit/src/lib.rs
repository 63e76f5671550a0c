//! Test and benchmark support.
//!
//! Module map:
//! - [`nats`] — a real `nats-server` (2.10+, JetStream on) on a free loopback
//!   port, stopped when dropped; can be stopped and restarted on the same port;
//!   and a cluster of them whose nodes can be killed one by one.
//! - [`ports`] — free TCP ports.
//! - [`http`]  — a small hyper-based HTTP client.
#![forbid(unsafe_code)]

pub mod http;
pub mod nats;
pub mod ports;

pub use nats::{NatsCluster, NatsServer};
pub use ports::free_port;

/// The workspace's root directory.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
