//! Graceful shutdown: one [`Shutdown`] token per process (or per in-process
//! service in tests), cancelled by a signal or by the owner. Every long-lived
//! task selects on it and returns when it fires.

pub use tokio_util::sync::CancellationToken as Shutdown;

/// Returns a token that is cancelled on Ctrl-C or SIGTERM.
pub fn shutdown_on_signal() -> Shutdown {
    let token = Shutdown::new();
    let trip = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("signal received, shutting down");
        trip.cancel();
    });
    token
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(err) => {
            tracing::warn!(%err, "cannot listen for SIGTERM; Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
