//! Wiring: connect to NATS, spawn the owned shards' actors, their intake and
//! responders, and the admin endpoint; stop everything on shutdown.

use anyhow::Context;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::time::Duration;
use tether_session::TableLimits;
use tether_telemetry::{AdminState, Shutdown, admin_router, spawn_server};

use crate::actor::{ActorConfig, ShardActor};
use crate::{Config, intake, metrics::Metrics, responders, shards};

/// A started service.
pub struct Running {
    pub admin_addr: SocketAddr,
    pub admin: AdminState,
    pub shards: Vec<u16>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Waits until every task has stopped (after the shutdown token fired).
    pub async fn join(self) {
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

pub async fn start(config: Config, shutdown: Shutdown) -> anyhow::Result<Running> {
    let owned = shards::parse(&config.owned_shards, config.bus.shards)?;
    let bus = config.bus.connect("tether-session-state").await?;

    let metrics = Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    bus.stats.register(&mut registry);
    let admin = AdminState::new(registry);

    let per_shard = if config.max_sessions == 0 {
        0
    } else {
        (config.max_sessions / owned.len()).max(1)
    };
    let actor_cfg = ActorConfig {
        shards: config.bus.shards,
        limits: TableLimits {
            idle_ttl_ms: config.idle_ttl_secs.saturating_mul(1000),
            call_timeout_ms: config.call_timeout_secs.saturating_mul(1000),
            max_sessions: per_shard,
        },
        delta_interval: Duration::from_millis(config.delta_interval_ms),
        max_delta_records: config.max_delta_records,
        evict_interval: Duration::from_secs(config.idle_ttl_secs.clamp(1, 60)),
    };

    let mut tasks = Vec::new();
    for &shard in &owned {
        let actor = ShardActor::new(shard, actor_cfg.clone(), bus.clone(), metrics.clone());
        let (mailbox, handle) = actor.spawn(config.mailbox, shutdown.clone());
        tasks.push(handle);
        tasks.push(intake::spawn_intake(&bus, shard, mailbox.clone(), shutdown.clone()).await?);
        tasks.push(responders::spawn_responders(&bus, shard, mailbox, shutdown.clone()).await?);
    }

    let (admin_addr, server) = spawn_server(
        config.admin_listen,
        admin_router(admin.clone()),
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("binding the admin endpoint on {}", config.admin_listen))?;
    tasks.push(server);
    // Ready once subscribed; the subscriptions are registered with the client
    // and re-established by it after a reconnect.
    admin.set_ready(true);
    tracing::info!(shards = ?owned, %admin_addr, "session-state running");
    Ok(Running {
        admin_addr,
        admin,
        shards: owned,
        tasks,
    })
}
