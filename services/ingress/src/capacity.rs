//! Capacity control, live: every interval, scrape each engine's `/metrics`
//! and set the gateway's limit for it by [`tether_policy::next_limit`]
//! (the rule and its reasons are in `shared/policy/src/capacity.rs` and
//! `docs/policy.md`). An engine whose scrape fails keeps its limit: health
//! is the prober's business, not this loop's.

use std::sync::Arc;
use std::time::Duration;
use tether_policy::{CapacityConfig, CapacitySignal, next_limit};
use tether_telemetry::Shutdown;

use crate::metrics::label;
use crate::service::App;

pub(crate) fn spawn_controller(
    app: Arc<App>,
    cfg: CapacityConfig,
    max: Vec<usize>,
    replicas: usize,
    interval: Duration,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let timeout = interval.max(Duration::from_millis(200));
        // The last scrape's waiting queue per engine: only a queue seen twice
        // in a row counts.
        let mut last_waiting = vec![0.0f64; app.fleet.engines.len()];
        let mut peaks = vec![0usize; app.fleet.engines.len()];
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let scrapes = app.fleet.engines.iter().map(|e| {
                let (app, url, kind) = (app.clone(), e.endpoint("/metrics"), e.kind);
                async move { tether_fleet::scrape(&app.client, &url, kind, timeout).await }
            });
            let samples = futures::future::join_all(scrapes).await;
            for (i, sample) in samples.into_iter().enumerate() {
                let Some(s) = sample else { continue };
                let (in_use, limit, _) = app.gateway.usage(i);
                let signal = CapacitySignal {
                    limit,
                    max: max.get(i).copied().unwrap_or(limit),
                    in_use,
                    demand: app.gateway.waiting() > 0,
                    engine_waiting: s.waiting.min(last_waiting[i]),
                    engine_running: s.running,
                    replicas,
                    kv_usage: s.kv_usage,
                };
                last_waiting[i] = s.waiting;
                let (next, peak) = next_limit(&cfg, &signal, peaks[i]);
                peaks[i] = peak;
                if next != limit {
                    app.gateway.set_limit(i, next);
                }
                let name = &app.fleet.engines[i].name;
                app.metrics
                    .limit
                    .get_or_create(&label("engine", name))
                    .set(i64::try_from(next).unwrap_or(i64::MAX));
                app.metrics
                    .engine_waiting
                    .get_or_create(&label("engine", name))
                    .set(s.waiting as i64);
            }
        }
    })
}
