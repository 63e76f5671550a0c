//! `tether-engine-sim`: serves one simulated engine until Ctrl-C or SIGTERM.
//!
//! Every knob is a flag with a `TETHER_SIM_*` environment fallback; a TOML
//! file named by `--config` (or `TETHER_SIM_CONFIG`) supplies values for
//! knobs given neither on the command line nor in the environment. Its keys
//! are the flags' long names, with `_` or `-`.

use anyhow::Context;
use clap::Parser;
use std::ffi::OsString;
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
    let cli = Cli::parse_from(args_with_config_file()?);
    cli.sim.validate()?;
    let _telemetry = tether_telemetry::init("tether-engine-sim")?;
    let shutdown = tether_telemetry::shutdown_on_signal();
    let listener = tokio::net::TcpListener::bind(cli.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cli.listen))?;
    tracing::info!(addr = %cli.listen, config = ?cli.sim, "engine-sim listening");
    serve(listener, cli.sim, async move { shutdown.cancelled().await }).await
}

/// The process arguments with the config file's values put in front as
/// flags, so that the real flags (later; `args_override_self`) win. A key
/// whose `TETHER_SIM_*` variable is set is left out, so the environment
/// wins over the file.
fn args_with_config_file() -> anyhow::Result<Vec<OsString>> {
    let args: Vec<OsString> = std::env::args_os().collect();
    let path = config_path(&args).or_else(|| std::env::var_os("TETHER_SIM_CONFIG"));
    let Some(path) = path else { return Ok(args) };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read config file {}", path.to_string_lossy()))?;
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("config file {}", path.to_string_lossy()))?;
    let mut out: Vec<OsString> = args.iter().take(1).cloned().collect();
    for (key, value) in table {
        let flag = key.replace('_', "-");
        let env = format!("TETHER_SIM_{}", key.replace('-', "_").to_uppercase());
        if flag == "config" || std::env::var_os(env).is_some() {
            continue;
        }
        let value = match value {
            toml::Value::String(s) => s,
            toml::Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    toml::Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        };
        out.push(format!("--{flag}").into());
        out.push(value.into());
    }
    out.extend(args.into_iter().skip(1));
    Ok(out)
}

/// The value of `--config` (`--config x` or `--config=x`), if given.
fn config_path(args: &[OsString]) -> Option<OsString> {
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().cloned();
        }
        if let Some(v) = a.strip_prefix("--config=") {
            return Some(v.into());
        }
    }
    None
}
