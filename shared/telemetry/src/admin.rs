//! The admin endpoint each service exposes: Prometheus `/metrics`, liveness
//! `/health` and readiness `/ready` (200 once the service has what it needs
//! to do its job, 503 before).

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use prometheus_client::registry::Registry;
use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use crate::Shutdown;

/// A condition readiness also needs (e.g. "the bus is connected").
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// What the admin routes read.
#[derive(Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub ready: Arc<AtomicBool>,
    checks: Arc<std::sync::RwLock<Vec<ReadyCheck>>>,
}

impl AdminState {
    pub fn new(registry: Registry) -> Self {
        Self {
            registry: Arc::new(registry),
            ready: Arc::new(AtomicBool::new(false)),
            checks: Arc::default(),
        }
    }

    /// Adds a condition: the service is ready only while `check` holds too.
    pub fn require(&self, check: impl Fn() -> bool + Send + Sync + 'static) {
        if let Ok(mut checks) = self.checks.write() {
            checks.push(Arc::new(check));
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && self
                .checks
                .read()
                .map(|checks| checks.iter().all(|c| c()))
                .unwrap_or(false)
    }

    /// The registry in Prometheus text format.
    pub fn render_metrics(&self) -> String {
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(%err, "metrics encoding failed");
        }
        out
    }
}

/// `/metrics`, `/health` and `/ready`, to merge into a service's router or to
/// serve alone with [`serve_http`].
pub fn admin_router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health", get(|| async { "ok" }))
        .route("/ready", get(ready))
        .with_state(state)
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.render_metrics(),
    )
}

async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    if state.is_ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// Serves `router` on `listener` (with `TCP_NODELAY`) until `shutdown` fires.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: Shutdown,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// Binds `addr` and serves `router` there in a task until `shutdown`.
/// Returns the bound address (useful with port 0) and the task.
pub async fn spawn_server(
    addr: std::net::SocketAddr,
    router: Router,
    shutdown: Shutdown,
) -> std::io::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(err) = serve_http(listener, router, shutdown).await {
            tracing::error!(%err, %bound, "HTTP server failed");
        }
    });
    Ok((bound, task))
}
