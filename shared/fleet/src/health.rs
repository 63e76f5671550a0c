//! Active health probing: `GET <url>/health` every interval. An engine is
//! marked unhealthy after `fail_after` consecutive failures and healthy again
//! after `recover_after` consecutive successes. Engines start healthy, so a
//! service that just started does not refuse traffic.
//!
//! An engine can also be marked *stalled* by whoever watches its progress
//! (the ingress: calls waiting on it while its token counters stand still);
//! a stalled engine counts as unhealthy until the mark is lifted.
//!
//! The flags are atomics: readers on the request path never lock. Each
//! engine also has a watch channel of its state, so that a call waiting on
//! an engine can give up the moment it turns unhealthy
//! ([`FleetHealth::turned_unhealthy`]).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::{EngineClient, FleetConfig};

#[derive(Clone, Copy, Debug)]
pub struct HealthConfig {
    pub interval: Duration,
    pub timeout: Duration,
    pub fail_after: u32,
    pub recover_after: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(500),
            fail_after: 2,
            recover_after: 1,
        }
    }
}

#[derive(Debug)]
struct EngineFlags {
    healthy: AtomicBool,
    stalled: AtomicBool,
    failures: AtomicU32,
    successes: AtomicU32,
    /// Usable (healthy and not stalled), as last published.
    usable: watch::Sender<bool>,
}

impl EngineFlags {
    fn usable(&self) -> bool {
        self.healthy.load(Ordering::Relaxed) && !self.stalled.load(Ordering::Relaxed)
    }

    /// Tells waiters the current state, if it changed.
    fn publish(&self) {
        let now = self.usable();
        self.usable.send_if_modified(|v| {
            let changed = *v != now;
            *v = now;
            changed
        });
    }
}

/// Health of every engine of the fleet, by index in the fleet file.
#[derive(Debug, Clone)]
pub struct FleetHealth {
    flags: Arc<Vec<EngineFlags>>,
}

impl FleetHealth {
    pub fn new(engines: usize) -> Self {
        let flags = (0..engines)
            .map(|_| EngineFlags {
                healthy: AtomicBool::new(true),
                stalled: AtomicBool::new(false),
                failures: AtomicU32::new(0),
                successes: AtomicU32::new(0),
                usable: watch::Sender::new(true),
            })
            .collect();
        Self {
            flags: Arc::new(flags),
        }
    }

    /// Healthy and not stalled.
    #[inline]
    pub fn is_healthy(&self, engine: usize) -> bool {
        self.flags.get(engine).is_some_and(EngineFlags::usable)
    }

    /// Marks an engine stalled (it counts as unhealthy) or lifts the mark;
    /// true when that changed it.
    pub fn set_stalled(&self, engine: usize, stalled: bool) -> bool {
        let Some(f) = self.flags.get(engine) else {
            return false;
        };
        let changed = f.stalled.swap(stalled, Ordering::Relaxed) != stalled;
        if changed {
            f.publish();
        }
        changed
    }

    /// Resolves when `engine` turns unhealthy (or stalled) after this call
    /// (it subscribes at once, not when first polled). Never resolves for an
    /// engine that is unhealthy already — a call sent there anyway (every
    /// engine down) waits for its own timeout — nor for an unknown one.
    pub fn turned_unhealthy(
        &self,
        engine: usize,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let rx = self.flags.get(engine).map(|f| {
            let mut rx = f.usable.subscribe();
            let usable = *rx.borrow_and_update();
            (rx, usable)
        });
        async move {
            let Some((mut rx, true)) = rx else {
                return std::future::pending().await;
            };
            if rx.wait_for(|usable| !*usable).await.is_err() {
                // The flags are going away with the service.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Records one probe (or one real call's) outcome.
    pub fn record(&self, engine: usize, ok: bool, cfg: &HealthConfig) {
        let Some(f) = self.flags.get(engine) else {
            return;
        };
        if ok {
            f.failures.store(0, Ordering::Relaxed);
            let s = f.successes.fetch_add(1, Ordering::Relaxed) + 1;
            if s >= cfg.recover_after && !f.healthy.swap(true, Ordering::Relaxed) {
                tracing::info!(engine, "engine healthy again");
                f.publish();
            }
        } else {
            f.successes.store(0, Ordering::Relaxed);
            let n = f.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= cfg.fail_after && f.healthy.swap(false, Ordering::Relaxed) {
                tracing::warn!(engine, "engine marked unhealthy");
                f.publish();
            }
        }
    }
}

/// Probes every engine until `shutdown`.
pub fn spawn_prober(
    fleet: Arc<FleetConfig>,
    health: FleetHealth,
    client: EngineClient,
    cfg: HealthConfig,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let probes = fleet.engines.iter().enumerate().map(|(i, e)| {
                let client = client.clone();
                let url = e.endpoint("/health");
                async move { (i, probe(&client, &url, cfg.timeout).await) }
            });
            for (i, ok) in futures_join(probes).await {
                health.record(i, ok, &cfg);
            }
        }
    })
}

async fn futures_join<F: std::future::Future<Output = (usize, bool)> + Send + 'static>(
    futs: impl Iterator<Item = F>,
) -> Vec<(usize, bool)> {
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        if let Ok(r) = h.await {
            out.push(r);
        }
    }
    out
}

async fn probe(client: &EngineClient, url: &str, timeout: Duration) -> bool {
    let Ok(req) = http::Request::get(url).body(Full::new(Bytes::new())) else {
        return false;
    };
    match tokio::time::timeout(timeout, client.request(req)).await {
        Ok(Ok(resp)) => {
            let ok = resp.status().is_success();
            // Drain the body so the connection returns to the pool.
            let _ = resp.into_body().collect().await;
            ok
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hysteresis() {
        let cfg = HealthConfig {
            fail_after: 2,
            recover_after: 2,
            ..HealthConfig::default()
        };
        let h = FleetHealth::new(1);
        assert!(h.is_healthy(0));
        h.record(0, false, &cfg);
        assert!(h.is_healthy(0));
        h.record(0, false, &cfg);
        assert!(!h.is_healthy(0));
        h.record(0, true, &cfg);
        assert!(!h.is_healthy(0));
        h.record(0, true, &cfg);
        assert!(h.is_healthy(0));
        assert!(!h.is_healthy(5));
    }

    #[test]
    fn a_stalled_engine_is_unhealthy_until_the_mark_is_lifted() {
        let h = FleetHealth::new(1);
        assert!(h.set_stalled(0, true));
        assert!(!h.set_stalled(0, true), "no change");
        assert!(!h.is_healthy(0));
        assert!(h.set_stalled(0, false));
        assert!(h.is_healthy(0));
        assert!(!h.set_stalled(3, true), "unknown engine");
    }

    #[tokio::test]
    async fn waiters_learn_when_an_engine_turns_unhealthy() {
        let cfg = HealthConfig {
            fail_after: 1,
            ..HealthConfig::default()
        };
        let h = FleetHealth::new(2);
        let waiter = h.turned_unhealthy(0);
        tokio::pin!(waiter);
        // Subscribed when made; polled once, not resolved.
        let short = Duration::from_millis(20);
        assert!(tokio::time::timeout(short, &mut waiter).await.is_err());
        // Engine 1's failure is not engine 0's.
        h.record(1, false, &cfg);
        assert!(tokio::time::timeout(short, &mut waiter).await.is_err());
        h.record(0, false, &cfg);
        let told = tokio::time::timeout(Duration::from_secs(5), &mut waiter).await;
        assert!(told.is_ok(), "the waiter is told");
        // Already unhealthy: waiting on it never resolves.
        assert!(
            tokio::time::timeout(short, h.turned_unhealthy(1))
                .await
                .is_err()
        );
        // A stall mark tells waiters too.
        let h = FleetHealth::new(1);
        let waiter = h.turned_unhealthy(0);
        tokio::pin!(waiter);
        assert!(tokio::time::timeout(short, &mut waiter).await.is_err());
        h.set_stalled(0, true);
        let told = tokio::time::timeout(Duration::from_secs(5), &mut waiter).await;
        assert!(told.is_ok(), "the waiter is told of the stall");
    }
}
