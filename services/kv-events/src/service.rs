//! Wiring: read the fleet, connect to NATS, start one relay per engine that
//! has a `kv_events` endpoint, serve the admin endpoint. Ready when every
//! engine's publisher is connected (and NATS is).

use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tether_fleet::FleetConfig;
use tether_telemetry::{AdminState, Shutdown, Tasks, serve_admin};

use crate::relay::{Readiness, Relay, SnapshotAsk, Stream};
use crate::{Config, metrics::Metrics};
use tether_protocol::KvSnapshotRequest;

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
    let streams: Vec<Stream> = fleet
        .engines
        .iter()
        .filter_map(|e| {
            e.kv_events.as_ref().map(|ep| Stream {
                engine: e.name.clone(),
                events: ep.clone(),
                replay: e.kv_replay.clone(),
            })
        })
        .collect();
    anyhow::ensure!(
        !streams.is_empty(),
        "no engine in the fleet has a kv_events endpoint"
    );
    let bus = config.bus.connect("tether-kv-events").await?;
    let metrics = Metrics::default();
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    bus.stats.register(&mut registry);
    let admin = AdminState::new(registry);
    let ready = Readiness {
        admin: admin.clone(),
        connected: Arc::new(AtomicUsize::new(0)),
        total: streams.len(),
    };
    let timeout = Duration::from_millis(config.replay_timeout_ms.max(1));
    let mut tasks = Tasks::default();
    // Snapshot requests, dispatched to the engine's relay task.
    let mut asks = std::collections::HashMap::new();
    let mut inboxes = Vec::new();
    for s in &streams {
        let (tx, rx) = tokio::sync::mpsc::channel::<SnapshotAsk>(64);
        asks.insert(s.engine.clone(), tx);
        inboxes.push(rx);
    }
    let mut requests = bus.subscribe(bus.subjects.kv_snapshot()).await?;
    let (b, stop) = (bus.clone(), shutdown.clone());
    tasks.push(tokio::spawn(async move {
        use futures::StreamExt;
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = requests.next() => match m { Some(m) => m, None => return },
            };
            let Some(req) = b.decode::<KvSnapshotRequest>(&msg, "kv-snapshot") else {
                continue;
            };
            match asks.get(&req.engine) {
                Some(tx) => {
                    let _ = tx.try_send((req, msg));
                }
                None => {
                    let empty = tether_protocol::KvSnapshotPage {
                        engine: req.engine,
                        epoch: 0,
                        seq: 0,
                        blocks: Vec::new(),
                        next: None,
                    };
                    let _ = b.respond(&msg, &empty).await;
                }
            }
        }
    }));
    // NATS connects in the background and may drop: re-check now and then.
    let (r, b, stop) = (ready.clone(), bus.clone(), shutdown.clone());
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => r.refresh(&b),
            }
        }
    }));
    for (s, inbox) in streams.into_iter().zip(inboxes) {
        let relay = Relay::new(s, bus.clone(), metrics.clone(), timeout);
        tasks.push(tokio::spawn(relay.run(
            ready.clone(),
            inbox,
            shutdown.clone(),
        )));
    }
    let admin_addr = serve_admin(config.admin_listen, &admin, &shutdown, &mut tasks).await?;
    tracing::info!(%admin_addr, "kv-events relay running");
    Ok(Running {
        admin_addr,
        admin,
        tasks,
    })
}
