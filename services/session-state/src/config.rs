//! Configuration. Every knob is a flag with an environment fallback and a
//! default; `--config file.toml` supplies the rest (see `tether_telemetry::config_file`).

use clap::Parser;
use std::net::SocketAddr;

#[derive(Clone, Debug, Parser)]
#[command(
    name = "tether-session-state",
    version,
    about = "Tether's per-shard session-state actors",
    args_override_self = true
)]
pub struct Config {
    /// Optional TOML file with values for any of these flags.
    #[arg(long, env = "TETHER_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub bus: tether_bus::BusArgs,
    /// Shards this process owns: `all`, or a list of numbers and ranges (`0-7,12`).
    #[arg(long, env = "TETHER_OWNED_SHARDS", default_value = "all")]
    pub owned_shards: String,
    /// Seconds a session may stay idle (no call in flight) before it is evicted.
    #[arg(long, env = "TETHER_IDLE_TTL_SECS", default_value_t = 1800)]
    pub idle_ttl_secs: u64,
    /// Seconds after which a call with no end event is assumed lost.
    #[arg(long, env = "TETHER_CALL_TIMEOUT_SECS", default_value_t = 3600)]
    pub call_timeout_secs: u64,
    /// Most sessions this process holds (split evenly over its shards).
    #[arg(long, env = "TETHER_MAX_SESSIONS", default_value_t = 1_000_000)]
    pub max_sessions: usize,
    /// How long changes are batched before a delta is published, ms.
    #[arg(long, env = "TETHER_DELTA_INTERVAL_MS", default_value_t = 5)]
    pub delta_interval_ms: u64,
    /// Most session records in one delta message (bigger batches are split).
    #[arg(long, env = "TETHER_MAX_DELTA_RECORDS", default_value_t = 2000)]
    pub max_delta_records: usize,
    /// Capacity of each shard actor's mailbox.
    #[arg(long, env = "TETHER_MAILBOX", default_value_t = 8192)]
    pub mailbox: usize,
    /// Address of the admin endpoint (/metrics, /health, /ready).
    #[arg(long, env = "TETHER_ADMIN_LISTEN", default_value = "127.0.0.1:9102")]
    pub admin_listen: SocketAddr,
}
