//! Active health probing: `GET <url>/health` every interval. An engine is
//! marked unhealthy after `fail_after` consecutive failures and healthy again
//! after `recover_after` consecutive successes. Engines start healthy, so a
//! service that just started does not refuse traffic.
//!
//! The flags are atomics: readers on the request path never lock.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;
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

#[derive(Debug, Default)]
struct EngineFlags {
    healthy: AtomicBool,
    failures: AtomicU32,
    successes: AtomicU32,
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
                ..EngineFlags::default()
            })
            .collect();
        Self {
            flags: Arc::new(flags),
        }
    }

    #[inline]
    pub fn is_healthy(&self, engine: usize) -> bool {
        self.flags
            .get(engine)
            .is_some_and(|f| f.healthy.load(Ordering::Relaxed))
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
            }
        } else {
            f.successes.store(0, Ordering::Relaxed);
            let n = f.failures.fetch_add(1, Ordering::Relaxed) + 1;
            if n >= cfg.fail_after && f.healthy.swap(false, Ordering::Relaxed) {
                tracing::warn!(engine, "engine marked unhealthy");
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
}
