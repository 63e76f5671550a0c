use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = tether_loadgen::LoadgenConfig::parse();
    // First Ctrl-C: no new calls, the run ends when calls in flight do and
    // writes its records. Second: quit at once.
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_err() {
            return std::future::pending::<()>().await;
        }
        tracing::warn!("stopping: no new calls; waiting for calls in flight (Ctrl-C again quits)");
        let _ = stop_tx.send(());
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
    let summary = tether_loadgen::run_until(config, async {
        let _ = stop_rx.await;
    })
    .await?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
