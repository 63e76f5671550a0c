//! Wiring: connect to NATS, set up the events stream and the snapshot store
//! (durable mode), restore and spawn the owned shards' actors, their intake
//! and responders, and the admin endpoint; stop everything on shutdown.

use anyhow::Context;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::time::Duration;
use tether_bus::jetstream::{
    self as js, EventsStreamConfig, GetErrorKind, ObjectStore, snapshot_object_name,
};
use tether_session::{SessionTable, TableLimits};
use tether_telemetry::{AdminState, Shutdown, Tasks, serve_admin};
use tokio::io::AsyncReadExt;

use crate::actor::{ActorConfig, Restored, ShardActor, SnapshotSink};
use crate::intake::DurableIntake;
use crate::lease::{self, Fence, StartShard};
use crate::{Config, intake, metrics::Metrics, responders, shards, snapshot};

/// A started service.
pub struct Running {
    pub admin_addr: SocketAddr,
    pub admin: AdminState,
    pub shards: Vec<u16>,
    tasks: Tasks,
}

impl Running {
    /// Waits until every task has stopped (after the shutdown token fired).
    pub async fn join(self) {
        self.tasks.join().await;
    }

    /// Stops every task at once, without the shutdown path (no final flush,
    /// acknowledgement or snapshot): what a crash leaves behind, for tests.
    /// Under static ownership only: a leased shard's tasks belong to its
    /// lease task and outlive this (stop a leased replica's process instead).
    pub fn abort(self) {
        self.tasks.abort();
    }
}

/// What starting a durable shard needs.
struct ShardCtx {
    bus: tether_bus::Bus,
    actor_cfg: ActorConfig,
    metrics: Metrics,
    mailbox: usize,
    intake: DurableIntake,
    store: ObjectStore,
}

/// Restores a durable shard from its snapshot and starts its actor,
/// responders and intake (after the snapshot's sequence).
async fn start_durable_shard(
    ctx: &ShardCtx,
    shard: u16,
    fence: Fence,
    shutdown: Shutdown,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut restored = restore(
        &ctx.store,
        shard,
        ctx.actor_cfg.shards,
        ctx.actor_cfg.limits,
    )
    .await?;
    if restored.table.is_some() {
        ctx.metrics.snapshots_loaded.inc();
    }
    // Events after the snapshot that the stream no longer holds are lost.
    let mut stream = ctx.intake.stream.clone();
    let info = stream.info().await.ok().map(|i| i.state.clone());
    if let Some(state) = &info
        && state.last_sequence < restored.stream_seq
    {
        // The stream was recreated (or lost data) after the snapshot: its
        // numbering restarted; apply all it holds on top of the snapshot.
        ctx.metrics.replay_gaps.inc();
        tracing::error!(
            shard,
            snapshot_seq = restored.stream_seq,
            last = state.last_sequence,
            "the events stream is behind the snapshot (recreated or lost data); \
             replaying all it holds"
        );
        restored.stream_seq = 0;
    } else if let Some(info) = info
        && restored.table.is_some()
        && info.messages > 0
        && info.first_sequence > restored.stream_seq.saturating_add(1)
    {
        ctx.metrics.replay_gaps.inc();
        tracing::warn!(
            shard,
            snapshot_seq = restored.stream_seq,
            first_retained = info.first_sequence,
            "the events stream no longer holds every event after the snapshot; some may be \
             lost (retention shorter than the time since the snapshot)"
        );
    }
    let sink = SnapshotSink {
        store: ctx.store.clone(),
    };
    let actor = ShardActor::durable(
        shard,
        ctx.actor_cfg.clone(),
        ctx.bus.clone(),
        ctx.metrics.clone(),
        restored,
        sink,
        fence.clone(),
    );
    let after = actor.applied();
    let (mailbox, handle) = actor.spawn(ctx.mailbox, shutdown.clone());
    let mut tasks = vec![handle];
    let started = async {
        tasks.push(
            responders::spawn_responders(&ctx.bus, shard, mailbox.clone(), shutdown.clone())
                .await?,
        );
        tasks.push(
            intake::spawn_durable_intake(
                &ctx.bus,
                ctx.intake.clone(),
                shard,
                after,
                mailbox,
                fence,
                shutdown.clone(),
            )
            .await?,
        );
        anyhow::Ok(())
    }
    .await;
    if let Err(err) = started {
        shutdown.cancel();
        for t in tasks {
            let _ = t.await;
        }
        return Err(err);
    }
    Ok(tasks)
}

/// Loads a shard's snapshot; nothing (replay every retained event) when
/// there is none or it cannot be used.
async fn restore(
    store: &ObjectStore,
    shard: u16,
    shards: u16,
    limits: TableLimits,
) -> anyhow::Result<Restored> {
    let name = snapshot_object_name(shard);
    let mut object = match store.get(&name).await {
        Ok(o) => o,
        Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(Restored::default()),
        Err(e) => return Err(e).with_context(|| format!("loading snapshot {name}")),
    };
    let mut bytes = Vec::new();
    object
        .read_to_end(&mut bytes)
        .await
        .with_context(|| format!("reading snapshot {name}"))?;
    match snapshot::decode(&bytes) {
        Ok(s) if s.shard == shard && s.shards == shards => {
            tracing::info!(
                shard,
                sessions = s.sessions.len(),
                stream_seq = s.stream_seq,
                "snapshot loaded; replaying the events after it"
            );
            Ok(Restored {
                table: Some(SessionTable::from_sessions(limits, s.sessions)),
                stream_seq: s.stream_seq,
                delta_seq: s.delta_seq,
            })
        }
        Ok(s) => {
            tracing::warn!(
                shard,
                snapshot_shards = s.shards,
                shards,
                "snapshot taken with another shard count ignored; replaying every retained event"
            );
            Ok(Restored::default())
        }
        Err(err) => {
            tracing::warn!(shard, %err, "snapshot unusable; replaying every retained event");
            Ok(Restored::default())
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
        announce_interval: Duration::from_millis(config.announce_interval_ms),
        snapshot_interval: Duration::from_millis(config.snapshot_interval_ms),
    };

    let durable = if config.durable {
        let context = bus.jetstream();
        let retention = config.events_retention_secs.max(config.idle_ttl_secs);
        if retention > config.events_retention_secs {
            tracing::info!(retention, "events retention raised to the idle TTL");
        }
        let stream = js::ensure_events_stream(
            &context,
            &bus.subjects,
            EventsStreamConfig {
                max_age: Duration::from_secs(retention),
                replicas: config.js_replicas,
                duplicate_window: Duration::from_secs(config.events_dedup_window_secs.max(1)),
            },
        )
        .await?;
        let store = js::snapshot_store(&context, &bus.subjects, config.js_replicas).await?;
        Some((
            DurableIntake {
                stream,
                ack_wait: Duration::from_secs(30),
                max_ack_pending: config.max_ack_pending.max(1),
                batch: 512,
                metrics: metrics.clone(),
            },
            store,
        ))
    } else {
        None
    };

    let mut tasks = Tasks::default();
    match durable {
        None => {
            anyhow::ensure!(
                config.lease_ttl_ms == 0,
                "shard leases (--lease-ttl-ms) need --durable"
            );
            for &shard in &owned {
                let actor = ShardActor::new(shard, actor_cfg.clone(), bus.clone(), metrics.clone());
                let (mailbox, handle) = actor.spawn(config.mailbox, shutdown.clone());
                tasks.push(handle);
                tasks.push(
                    intake::spawn_intake(&bus, shard, mailbox.clone(), shutdown.clone()).await?,
                );
                tasks.push(
                    responders::spawn_responders(&bus, shard, mailbox, shutdown.clone()).await?,
                );
            }
        }
        Some((intake_cfg, store)) => {
            let ctx = std::sync::Arc::new(ShardCtx {
                bus: bus.clone(),
                actor_cfg: actor_cfg.clone(),
                metrics: metrics.clone(),
                mailbox: config.mailbox,
                intake: intake_cfg,
                store,
            });
            if config.lease_ttl_ms == 0 {
                for &shard in &owned {
                    tasks.extend(
                        start_durable_shard(&ctx, shard, Fence::always(), shutdown.clone()).await?,
                    );
                }
            } else {
                let ttl = Duration::from_millis(config.lease_ttl_ms.max(30));
                let leases =
                    js::lease_store(&bus.jetstream(), &bus.subjects, ttl, config.js_replicas)
                        .await?;
                let owner = format!(
                    "session-state-{}-{:016x}",
                    std::process::id(),
                    tether_protocol::random_u64()
                );
                let start: StartShard =
                    std::sync::Arc::new(move |shard, fence, _revision, token| {
                        let ctx = ctx.clone();
                        Box::pin(
                            async move { start_durable_shard(&ctx, shard, fence, token).await },
                        )
                    });
                for &shard in &owned {
                    tasks.push(lease::spawn_lease(
                        leases.clone(),
                        shard,
                        owner.clone(),
                        ttl,
                        start.clone(),
                        metrics.clone(),
                        shutdown.clone(),
                    ));
                }
            }
        }
    }

    let admin_addr = serve_admin(config.admin_listen, &admin, &shutdown, &mut tasks).await?;
    // Ready once subscribed; the subscriptions are registered with the client
    // and re-established by it after a reconnect. Not ready while the bus is
    // not connected (wrong credentials, NATS down).
    let ready_bus = bus.clone();
    admin.require(move || ready_bus.is_connected());
    admin.set_ready(true);
    tracing::info!(shards = ?owned, %admin_addr, "session-state running");
    Ok(Running {
        admin_addr,
        admin,
        shards: owned,
        tasks,
    })
}
