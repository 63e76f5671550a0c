//! Configuration. Every knob is a flag with an environment fallback and a
//! default; `--config file.toml` supplies the rest.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, Parser)]
#[command(
    name = "tether-kv-events",
    version,
    about = "Relays each engine's KV cache events (vLLM's ZMQ publisher) onto NATS",
    args_override_self = true
)]
pub struct Config {
    /// Optional TOML file with values for any of these flags.
    #[arg(long, env = "TETHER_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub bus: tether_bus::BusArgs,
    /// The fleet file; engines with a `kv_events` endpoint are followed.
    #[arg(long, env = "TETHER_FLEET", default_value = "deploy/local/fleet.toml")]
    pub fleet: PathBuf,
    /// Address of the admin endpoint (/metrics, /health, /ready).
    #[arg(long, env = "TETHER_ADMIN_LISTEN", default_value = "127.0.0.1:9104")]
    pub admin_listen: SocketAddr,
    /// How long a replay may take (connect, request, every batch), ms; past
    /// it the engine is reset instead.
    #[arg(long, env = "TETHER_KV_REPLAY_TIMEOUT_MS", default_value_t = 2000)]
    pub replay_timeout_ms: u64,
}
