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
    /// Keep state durably: events through the JetStream events stream, shard
    /// snapshots in the snapshot store, replay after a restart. `false`:
    /// core NATS and memory only (what arrives while the service is down is lost).
    #[arg(long, env = "TETHER_DURABLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub durable: bool,
    /// How long the events stream keeps events, seconds; raised to the idle
    /// TTL when shorter (a restarted shard must find every event after its snapshot).
    #[arg(long, env = "TETHER_EVENTS_RETENTION_SECS", default_value_t = 3600)]
    pub events_retention_secs: u64,
    /// Window in which JetStream drops an event repeated with the same id, seconds.
    #[arg(long, env = "TETHER_EVENTS_DEDUP_WINDOW_SECS", default_value_t = 120)]
    pub events_dedup_window_secs: u64,
    /// Copies of the events stream and the snapshot store (JetStream replicas; 1, 3 or 5).
    #[arg(long, env = "TETHER_JS_REPLICAS", default_value_t = 1)]
    pub js_replicas: usize,
    /// How often a changed shard writes its snapshot, ms.
    #[arg(long, env = "TETHER_SNAPSHOT_INTERVAL_MS", default_value_t = 10_000)]
    pub snapshot_interval_ms: u64,
    /// How often each shard announces its epoch with an empty delta, ms (so
    /// that schedulers resync idle shards after a restart).
    #[arg(long, env = "TETHER_ANNOUNCE_INTERVAL_MS", default_value_t = 2_000)]
    pub announce_interval_ms: u64,
    /// Shard leases: 0 assigns `--owned-shards` statically; above 0 the
    /// listed shards are candidates, each run by whichever replica holds its
    /// lease, renewed every third of this TTL (ms). Requires `--durable`.
    #[arg(long, env = "TETHER_LEASE_TTL_MS", default_value_t = 0)]
    pub lease_ttl_ms: u64,
    /// Stream deliveries a shard may hold unacknowledged.
    #[arg(long, env = "TETHER_MAX_ACK_PENDING", default_value_t = 20_000)]
    pub max_ack_pending: i64,
    /// Address of the admin endpoint (/metrics, /health, /ready).
    #[arg(long, env = "TETHER_ADMIN_LISTEN", default_value = "127.0.0.1:9102")]
    pub admin_listen: SocketAddr,
}
