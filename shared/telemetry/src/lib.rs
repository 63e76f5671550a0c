//! What every Tether service does the same way around its own work.
//!
//! Module map:
//! - [`tracing_setup`] — logs to stderr and, when `OTEL_EXPORTER_OTLP_ENDPOINT`
//!   is set, spans over OTLP/gRPC; the W3C trace-context propagator.
//! - [`admin`]   — the admin HTTP endpoint: `/metrics`, `/health`, `/ready`.
//! - [`shutdown`] — a cancellation token tripped by Ctrl-C or SIGTERM.
//! - [`config_file`] — the optional TOML config file behind the CLI flags.
//! - [`tasks`]   — a started service's tasks, and binding its admin endpoint.
#![forbid(unsafe_code)]

pub mod admin;
pub mod config_file;
pub mod shutdown;
pub mod tasks;
pub mod tracing_setup;

pub use admin::{AdminState, admin_router, serve_http, spawn_server};
pub use config_file::{args_with_config_file, args_with_config_file_for};
pub use shutdown::{Shutdown, shutdown_on_signal};
pub use tasks::{Tasks, serve_admin};
pub use tracing_setup::{TelemetryGuard, init, init_with_provider};

/// One label whose key and value are known at compile time: the families
/// counted on every call use it, so an increment allocates nothing.
pub type StaticLabel = [(&'static str, &'static str); 1];
