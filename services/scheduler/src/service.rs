//! Wiring: read the fleet, connect, subscribe, probe engines, run the actor.

use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tether_fleet::{
    FleetConfig, FleetHealth, FleetLoad, HealthConfig, engine_client, spawn_scraper,
};
use tether_protocol::subjects::SCHEDULER_QUEUE_GROUP;
use tether_telemetry::{AdminState, Shutdown, Tasks, serve_admin};

use crate::core::{Core, Subscriptions};
use crate::decider::Decider;
use crate::{Config, metrics::Metrics};

pub struct Running {
    pub admin_addr: SocketAddr,
    pub admin: AdminState,
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
    let bus = config.bus.connect("tether-scheduler").await?;
    let metrics = Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    bus.stats.register(&mut registry);
    let admin = AdminState::new(registry);
    // Not ready while the bus is not connected (wrong credentials, NATS down).
    let ready_bus = bus.clone();
    admin.require(move || ready_bus.is_connected());

    let health = FleetHealth::new(fleet.engines.len());
    let reported = FleetLoad::new(fleet.engines.len());
    let health_cfg = HealthConfig {
        interval: Duration::from_millis(config.scrape_interval_ms.max(10)),
        fail_after: 3,
        recover_after: 2,
        ..HealthConfig::default()
    };
    let mut tasks = Tasks::default();
    tasks.push(spawn_scraper(
        fleet.clone(),
        reported.clone(),
        health.clone(),
        engine_client(),
        health_cfg,
        shutdown.clone(),
    ));

    let subs = Subscriptions {
        route: bus
            .queue_subscribe(bus.subjects.route(), SCHEDULER_QUEUE_GROUP)
            .await?,
        state: bus.subscribe(bus.subjects.state_all()).await?,
        events: bus.subscribe(bus.subjects.events_all()).await?,
        kv: if config.prefix_source == "exact" {
            Some(bus.subscribe(bus.subjects.kv_all()).await?)
        } else {
            None
        },
    };
    metrics
        .prefix_source
        .get_or_create(&crate::metrics::label("source", &config.prefix_source))
        .set(1);
    let engines = fleet.engines.len();
    let mut decider = Decider::new(fleet, health, reported, config.bus.shards, config.knobs());
    if config.prefix_source == "exact" {
        decider.kv = crate::kv_index::KvIndex::new(
            engines,
            config.kv_index_blocks,
            config.kv_provisional_ms,
        );
    }
    let core = Core::new(
        decider,
        bus,
        metrics,
        admin.clone(),
        config.bus.shards,
        config.snapshot_page,
        Duration::from_secs(config.call_timeout_secs),
    );
    tasks.push(tokio::spawn(core.run(subs, shutdown.clone())));

    let admin_addr = serve_admin(config.admin_listen, &admin, &shutdown, &mut tasks).await?;
    tracing::info!(%admin_addr, "scheduler running");
    Ok(Running {
        admin_addr,
        admin,
        tasks,
    })
}
