//! The HTTP server, on hyper directly so that hostile clients are bounded:
//! a connection must deliver a request's headers within the header-read
//! timeout, which is also how long a kept-alive connection may sit idle
//! between requests (slowloris and silent connections are closed). Request
//! bodies are bounded in [`crate::handlers`] (size, read time, and the bytes
//! buffered over all calls at once).

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::time::Duration;
use tether_telemetry::Shutdown;

/// Binds `addr` and serves `router` until `shutdown` (then lets the open
/// connections finish their calls). Returns the bound address and the task.
pub async fn spawn(
    addr: SocketAddr,
    router: Router,
    header_read_timeout: Option<Duration>,
    shutdown: Shutdown,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.cancelled() => break,
            };
            let tcp = match accepted {
                Ok((tcp, _)) => tcp,
                Err(err) => {
                    // Out of descriptors, most likely: back off a little.
                    tracing::warn!(%err, %bound, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let service = TowerToHyperService::new(router.clone());
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout);
            let stop = shutdown.clone();
            conns.spawn(async move {
                let conn = builder.serve_connection(TokioIo::new(tcp), service);
                tokio::pin!(conn);
                tokio::select! {
                    _ = conn.as_mut() => {}
                    _ = stop.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
            });
            while conns.try_join_next().is_some() {}
        }
        while conns.join_next().await.is_some() {}
    });
    Ok((bound, task))
}
