//! `tether-engine-sim`: serves one simulated engine until Ctrl-C or SIGTERM.
//!
//! Every knob is a flag with a `TETHER_SIM_*` environment fallback; a TOML
//! file named by `--config` (or `TETHER_SIM_CONFIG`) supplies values for
//! knobs given neither on the command line nor in the environment. Its keys
//! are the flags' long names, with `_` or `-`.

use anyhow::Context;
use clap::Parser;
use std::net::SocketAddr;
use tether_engine_sim::{SimConfig, serve};

/// An OpenAI-compatible simulated LLM engine that schedules like vLLM.
#[derive(Parser, Debug)]
#[command(name = "tether-engine-sim", version, args_override_self = true)]
struct Cli {
    /// Optional TOML file with values for any of these flags.
    #[arg(long, env = "TETHER_SIM_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// Listen address.
    #[arg(long, env = "TETHER_SIM_LISTEN", default_value = "127.0.0.1:8101")]
    listen: SocketAddr,
    #[command(flatten)]
    sim: SimConfig,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse_from(tether_telemetry::args_with_config_file_for("TETHER_SIM_")?);
    cli.sim.validate()?;
    let _telemetry = tether_telemetry::init("tether-engine-sim")?;
    let shutdown = tether_telemetry::shutdown_on_signal();
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    tracing::info!(addr = %cli.listen, config = ?cli.sim, "engine-sim listening");
    serve(listener, cli.sim, async move { shutdown.cancelled().await }).await
}
