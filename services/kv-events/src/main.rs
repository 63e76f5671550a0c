use clap::Parser;
use tether_kv_events::{Config, start};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse_from(tether_telemetry::args_with_config_file()?);
    let _telemetry = tether_telemetry::init("tether-kv-events")?;
    let shutdown = tether_telemetry::shutdown_on_signal();
    let running = start(config, shutdown).await?;
    running.join().await;
    Ok(())
}
