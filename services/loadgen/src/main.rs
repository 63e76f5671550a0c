use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = tether_loadgen::Cli::parse();
    let summary = tether_loadgen::run(cli).await?;
    println!("{}", serde_json::to_string_pretty(&summary)?);
    Ok(())
}
