//! Wiring: the shared [`App`] state, the router, and start-up.

use anyhow::Context;
use axum::Router;
use axum::routing::{get, post};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tether_bus::Bus;
use tether_fleet::{
    EngineClient, FleetConfig, FleetHealth, HealthConfig, engine_client, spawn_prober,
};
use tether_protocol::random_u64;
use tether_telemetry::{AdminState, Shutdown, Tasks, admin_router};

use crate::admission::Gateway;
use crate::events::{EventSink, PublishConfig, spawn_publisher};
use crate::metrics::{Metrics, label};
use crate::{Config, handlers};
use tether_policy::{CapacityConfig, CostModel, GateConfig};

/// What every request handler shares.
pub struct App {
    pub fleet: Arc<FleetConfig>,
    pub health: FleetHealth,
    pub health_cfg: HealthConfig,
    pub client: EngineClient,
    pub bus: Bus,
    pub events: EventSink,
    pub metrics: Metrics,
    pub cost: CostModel,
    pub shards: u16,
    pub session_headers: Vec<String>,
    /// Headers that mark a session as an agent program (lower case).
    pub program_headers: Vec<String>,
    /// Route requests carry engine-sim's token-block hashes (block size)
    /// instead of text-block hashes.
    pub sim_block_size: Option<usize>,
    /// Sessions with calls in flight here, and those that ran in parallel.
    pub programs: crate::programs::Programs,
    pub session_field: String,
    pub route_timeout_ms: u64,
    pub max_body_bytes: usize,
    pub engine_timeout_secs: u64,
    pub engine_ttfb_timeout_secs: f64,
    /// Engines a call may try in all (at least 1).
    pub engine_attempts: usize,
    /// Ejects engines whose calls keep failing.
    pub breaker: crate::breaker::Breaker,
    /// Calls waiting on each engine, for the stall watchdog.
    pub progress: Arc<crate::stall::Progress>,
    /// The engine that last served each recent session (for the fallback route).
    pub recent: crate::affinity::RecentAffinity,
    /// Request-body bytes that may be held at once, over all calls.
    pub body_budget: Arc<tokio::sync::Semaphore>,
    /// How long a request body may take to arrive (None: unbounded).
    pub body_read_timeout: Option<Duration>,
    /// API keys; None: the API is open.
    pub keys: Option<crate::auth::ApiKeys>,
    /// Salt of implicit session keys (empty: unkeyed).
    pub session_salt: Vec<u8>,
    in_flight: Vec<Gauge>,
    /// The engines' slots and the calls waiting for them.
    pub gateway: Gateway,
    call_ids: AtomicU64,
}

impl App {
    /// Call ids: a random base per process plus a counter, so ids from
    /// several ingress replicas do not collide in practice.
    pub fn next_call_id(&self) -> u64 {
        self.call_ids.fetch_add(1, Ordering::Relaxed)
    }

    pub fn in_flight_gauge(&self, engine: usize) -> &Gauge {
        &self.in_flight[engine]
    }
}

pub struct Running {
    pub addr: SocketAddr,
    /// The admin listener's address, when --admin-listen is set.
    pub admin_addr: Option<SocketAddr>,
    pub admin: AdminState,
    pub app: Arc<App>,
    tasks: Tasks,
}

impl Running {
    pub async fn join(self) {
        self.tasks.join().await;
    }
}

pub async fn start(config: Config, shutdown: Shutdown) -> anyhow::Result<Running> {
    let fleet = Arc::new(FleetConfig::load(&config.fleet)?);
    start_with_fleet(config, fleet, shutdown).await
}

pub async fn start_with_fleet(
    config: Config,
    fleet: Arc<FleetConfig>,
    shutdown: Shutdown,
) -> anyhow::Result<Running> {
    anyhow::ensure!(!fleet.engines.is_empty(), "the fleet has no engines");
    let bus = config.bus.connect("tether-ingress").await?;
    let metrics = Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    bus.stats.register(&mut registry);
    let mut tasks = Tasks::default();
    let (events, publisher) = spawn_publisher(
        bus.clone(),
        config.bus.shards,
        PublishConfig {
            buffer: config.event_buffer,
            acks: config.event_acks,
            window: config.event_ack_window,
            ack_timeout: Duration::from_millis(config.event_ack_timeout_ms.max(1)),
        },
        shutdown.clone(),
    );
    tasks.push(publisher);
    registry.register(
        "tether_ingress_events_dropped",
        "Lifecycle events dropped: the publish buffer was full, or shutdown came before the stream acknowledged them",
        events.counters.dropped.clone(),
    );
    registry.register(
        "tether_ingress_events_retried",
        "Lifecycle events published again because the events stream did not acknowledge them",
        events.counters.retried.clone(),
    );
    let admin = AdminState::new(registry);

    let health = FleetHealth::new(fleet.engines.len());
    let health_cfg = HealthConfig {
        interval: Duration::from_millis(config.health_interval_ms.max(10)),
        ..HealthConfig::default()
    };
    let client = engine_client();
    tasks.push(spawn_prober(
        fleet.clone(),
        health.clone(),
        client.clone(),
        health_cfg,
        shutdown.clone(),
    ));

    let progress = Arc::new(crate::stall::Progress::new(fleet.engines.len()));
    if config.engine_stall_secs > 0.0 && config.engine_stall_secs.is_finite() {
        tasks.push(crate::stall::spawn_watchdog(
            fleet.clone(),
            progress.clone(),
            health.clone(),
            client.clone(),
            metrics.clone(),
            Duration::from_secs_f64(config.engine_stall_secs),
            shutdown.clone(),
        ));
    }

    let in_flight = fleet
        .engines
        .iter()
        .map(|e| {
            metrics
                .in_flight
                .get_or_create(&label("engine", &e.name))
                .clone()
        })
        .collect();
    let gate_cfg = GateConfig {
        max_queue: config.max_queue,
        queue_starvation_ratio: config.queue_starvation_ratio,
        service_floor: config.service_floor,
        size_ratio: config.queue_size_ratio,
        // Each ingress replica stages its share of an engine's bound.
        stage_calls: config
            .stage_calls
            .div_ceil(config.ingress_replicas.max(1) as usize),
        stage_tokens: config.stage_tokens / config.ingress_replicas.max(1) as f64,
        decode_balance: config
            .decode_balance
            .div_ceil(config.ingress_replicas.max(1) as usize),
        // One step's budget is half the (whole engine's) staging token bound.
        step_tokens: config.stage_tokens / 2.0,
    };
    let replicas = config.ingress_replicas.max(1);
    let limits: Vec<usize> = fleet
        .engines
        .iter()
        .map(|e| e.max_concurrency.div_ceil(replicas) as usize)
        .collect();
    let headers = |list: &[String]| -> Vec<String> {
        list.iter()
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect()
    };
    let fleet_len = fleet.engines.len();
    let keys = crate::auth::ApiKeys::load(config.api_keys_file.as_deref(), &config.api_keys)?;
    if let Some(k) = &keys {
        tracing::info!(keys = k.len(), "API keys required");
    }
    let session_salt = match &config.session_key_salt_file {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the session key salt {}", path.display()))?
            .trim()
            .as_bytes()
            .to_vec(),
        None => config.session_key_salt.as_bytes().to_vec(),
    };
    let app = Arc::new(App {
        gateway: Gateway::new(&limits, gate_cfg, config.time_scale),
        program_headers: headers(&config.program_headers),
        sim_block_size: (config.block_hashes == "engine-sim").then_some(config.block_size.max(1)),
        programs: crate::programs::Programs::default(),
        fleet,
        health,
        health_cfg,
        client,
        bus,
        events,
        metrics,
        cost: CostModel {
            prefill_per_token: config.cost_prefill_per_token,
            decode_per_token: config.cost_decode_per_token,
        },
        shards: config.bus.shards,
        session_headers: headers(&config.session_headers),
        session_field: config.session_field.clone(),
        route_timeout_ms: config.route_timeout_ms,
        max_body_bytes: config.max_body_bytes,
        engine_timeout_secs: config.engine_timeout_secs,
        engine_ttfb_timeout_secs: config.engine_ttfb_timeout_secs,
        engine_attempts: config.engine_attempts.max(1) as usize,
        breaker: crate::breaker::Breaker::new(
            fleet_len,
            config.breaker_failures,
            Duration::from_millis(config.breaker_cooldown_ms),
        ),
        progress,
        recent: crate::affinity::RecentAffinity::new(config.affinity_cache),
        body_budget: Arc::new(tokio::sync::Semaphore::new(
            config
                .max_buffered_body_bytes
                .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
        )),
        body_read_timeout: (config.body_read_timeout_secs > 0)
            .then(|| Duration::from_secs(config.body_read_timeout_secs)),
        keys,
        session_salt,
        in_flight,
        call_ids: AtomicU64::new(random_u64() & 0xffff_ffff_0000_0000),
    });

    let api = Router::new()
        .route("/v1/chat/completions", post(handlers::chat))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/models", get(handlers::models));
    let sessions = Router::new().route("/v1/tether/sessions/{key}", get(handlers::session));
    // /health and /ready answer on the public listener in any case (load
    // balancers probe there); /metrics and the session view move to the
    // admin listener when there is one.
    let probes = {
        let admin = admin.clone();
        Router::new()
            .route("/health", get(|| async { "ok" }))
            .route(
                "/ready",
                get(move || {
                    let ready = admin.is_ready();
                    async move {
                        if ready {
                            (http::StatusCode::OK, "ready")
                        } else {
                            (http::StatusCode::SERVICE_UNAVAILABLE, "not ready")
                        }
                    }
                }),
            )
    };
    let header_timeout = (config.header_read_timeout_secs > 0)
        .then(|| Duration::from_secs(config.header_read_timeout_secs));
    let (router, admin_addr) = match config.admin_listen {
        None => (
            api.merge(sessions)
                .fallback(handlers::not_found)
                .with_state(app.clone())
                .merge(admin_router(admin.clone())),
            None,
        ),
        Some(admin_listen) => {
            let admin_routes = sessions
                .fallback(handlers::not_found)
                .with_state(app.clone())
                .merge(admin_router(admin.clone()));
            let (addr, server) =
                crate::server::spawn(admin_listen, admin_routes, header_timeout, shutdown.clone())
                    .await
                    .with_context(|| format!("binding the admin listener {admin_listen}"))?;
            tasks.push(server);
            tracing::info!(%addr, "ingress admin listening");
            (
                api.fallback(handlers::not_found)
                    .with_state(app.clone())
                    .merge(probes),
                Some(addr),
            )
        }
    };

    // Ready while at least one engine is healthy, once the bus has been
    // connected. A later NATS outage does not make the ingress unready: it
    // keeps serving with its fallback route (counted in
    // tether_ingress_route_fallbacks), which is what a load balancer wants;
    // a bus it never reached (wrong URL or credentials) does.
    let (ready_app, ready_admin, stop) = (app.clone(), admin.clone(), shutdown.clone());
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        let mut bus_seen = false;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            bus_seen |= ready_app.bus.is_connected();
            let any = (0..ready_app.fleet.engines.len()).any(|i| ready_app.health.is_healthy(i));
            ready_admin.set_ready(any && bus_seen);
            for (i, e) in ready_app.fleet.engines.iter().enumerate() {
                let (in_use, _, waiting) = ready_app.gateway.usage(i);
                let (staged, _) = ready_app.gateway.staged(i);
                let engine = label("engine", &e.name);
                ready_app
                    .metrics
                    .queued
                    .get_or_create(&engine)
                    .set(waiting as i64);
                ready_app
                    .metrics
                    .staged
                    .get_or_create(&engine)
                    .set(staged as i64);
                ready_app
                    .metrics
                    .decoding
                    .get_or_create(&engine)
                    .set(in_use.saturating_sub(staged) as i64);
                ready_app
                    .metrics
                    .ejected
                    .get_or_create(&engine)
                    .set(i64::from(ready_app.breaker.is_ejected(i)));
            }
        }
    }));

    let capacity = CapacityConfig {
        enabled: config.capacity_control,
        target_waiting: config.capacity_target_waiting,
        kv_high: config.capacity_kv_high,
    };
    if capacity.enabled {
        tasks.push(crate::capacity::spawn_controller(
            app.clone(),
            capacity,
            limits,
            replicas as usize,
            Duration::from_millis(config.capacity_interval_ms.max(5)),
            shutdown.clone(),
        ));
    }

    let (addr, server) = crate::server::spawn(config.listen, router, header_timeout, shutdown)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    tasks.push(server);
    tracing::info!(%addr, "ingress listening");
    Ok(Running {
        addr,
        admin_addr,
        admin,
        app,
        tasks,
    })
}
