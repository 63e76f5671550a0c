//! Engines that hold calls and answer nothing.
//!
//! A hung engine can still pass `/health` (a stuck step loop behind a
//! live HTTP server). A stream on it is caught by its first-byte bound
//! (`--engine-ttfb-timeout-secs`), but a call that does not stream waits
//! for its whole answer, up to `--engine-timeout-secs`. The watchdog here
//! catches the engine instead of the call:
//!
//! - [`Progress`] counts, per engine, the calls waiting for the engine's
//!   answer to begin (response headers, or a stream's first data) and the
//!   last time anything began to come back from it.
//! - Once calls have waited on an engine for half the stall bound with
//!   nothing back, the watchdog reads the engine's token counters
//!   (`prompt_tokens_total` + `generation_tokens_total` from `/metrics`);
//!   at the whole bound, and at least half the bound later, it reads them
//!   again. Counters that moved mean the
//!   engine works (long answers, a long prefill): the clock starts over.
//!   Counters that stood still mark the engine *stalled*: it counts as
//!   unhealthy, so no call is routed there and every call waiting on it
//!   is retried elsewhere ([`tether_fleet::FleetHealth::turned_unhealthy`]).
//! - An engine without those counters is never marked: nothing tells a
//!   stuck engine from a slow one.
//! - The mark is lifted after another stall bound; calls may then go to
//!   the engine again, and if it is still stuck they find it out the same
//!   way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tether_fleet::{EngineClient, FleetConfig, FleetHealth, metrics_text, tokens_processed};
use tether_telemetry::Shutdown;

use crate::metrics::{Metrics, label};

#[derive(Debug, Default)]
struct Slot {
    /// Calls waiting for this engine's answer to begin.
    waiting: AtomicUsize,
    /// When something last began to come back (ms since `epoch`), or a
    /// call started to wait on an engine nobody was waiting on.
    last_ms: AtomicU64,
}

/// Calls waiting on each engine and when each last answered.
#[derive(Debug)]
pub struct Progress {
    epoch: Instant,
    slots: Vec<Slot>,
}

/// One call waiting on an engine; dropping it ends the wait.
#[must_use = "the wait lasts as long as the guard"]
pub struct Waiting<'a> {
    progress: &'a Progress,
    engine: usize,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.progress.slots.get(self.engine) {
            s.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Progress {
    pub fn new(engines: usize) -> Self {
        Self {
            epoch: Instant::now(),
            slots: (0..engines).map(|_| Slot::default()).collect(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// A call starts waiting on `engine`. The first waiter on an idle
    /// engine starts its clock: an engine idle for an hour is not stuck.
    pub fn wait(&self, engine: usize) -> Waiting<'_> {
        if let Some(s) = self.slots.get(engine)
            && s.waiting.fetch_add(1, Ordering::Relaxed) == 0
        {
            s.last_ms.store(self.now_ms(), Ordering::Relaxed);
        }
        Waiting {
            progress: self,
            engine,
        }
    }

    /// Something began to come back from `engine`.
    pub fn saw(&self, engine: usize) {
        if let Some(s) = self.slots.get(engine) {
            s.last_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// How long calls have waited on `engine` with nothing back; None when
    /// no call waits on it.
    pub fn quiet_for(&self, engine: usize) -> Option<Duration> {
        let s = self.slots.get(engine)?;
        if s.waiting.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let since = self
            .now_ms()
            .saturating_sub(s.last_ms.load(Ordering::Relaxed));
        Some(Duration::from_millis(since))
    }
}

/// What the watchdog knows of one engine.
#[derive(Clone, Copy, Debug, Default)]
enum Watch {
    /// Answering, or nobody waits on it.
    #[default]
    Fine,
    /// Quiet for half the bound: its token counters then, and when.
    Suspect(f64, Instant),
    /// Marked stalled at this time.
    Stalled(Instant),
}

/// Watches every engine until `shutdown`; `stall` is the bound (> 0).
pub fn spawn_watchdog(
    fleet: Arc<FleetConfig>,
    progress: Arc<Progress>,
    health: FleetHealth,
    client: EngineClient,
    metrics: Metrics,
    stall: Duration,
    shutdown: Shutdown,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut state = vec![Watch::Fine; fleet.engines.len()];
        let period = (stall / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for (i, e) in fleet.engines.iter().enumerate() {
                let quiet = progress.quiet_for(i);
                state[i] = match (state[i], quiet) {
                    (Watch::Stalled(at), _) if at.elapsed() >= stall => {
                        // Another chance: calls may go there again.
                        health.set_stalled(i, false);
                        progress.saw(i);
                        tracing::info!(engine = %e.name, "stall mark lifted");
                        Watch::Fine
                    }
                    (s @ Watch::Stalled(_), _) => s,
                    (_, None) => Watch::Fine,
                    (_, Some(q)) if q < stall / 2 => Watch::Fine,
                    (Watch::Fine, Some(_)) => {
                        match counters(&client, &e.endpoint("/metrics"), e.kind).await {
                            Some(c) => Watch::Suspect(c, Instant::now()),
                            None => {
                                // Nothing to judge by (or /metrics failed,
                                // which the health probe sees): start over.
                                progress.saw(i);
                                Watch::Fine
                            }
                        }
                    }
                    // The counters must stand still for half the bound at
                    // least, however late a tick comes.
                    (s @ Watch::Suspect(_, since), Some(q))
                        if q < stall || since.elapsed() < stall / 2 =>
                    {
                        s
                    }
                    (Watch::Suspect(before, _), Some(q)) => {
                        match counters(&client, &e.endpoint("/metrics"), e.kind).await {
                            Some(now) if now <= before => {
                                health.set_stalled(i, true);
                                metrics
                                    .stalls
                                    .get_or_create(&label("engine", &e.name))
                                    .inc();
                                tracing::warn!(
                                    engine = %e.name,
                                    quiet_secs = q.as_secs_f64(),
                                    "engine stalled: calls wait on it and its token counters stand still"
                                );
                                Watch::Stalled(Instant::now())
                            }
                            _ => {
                                progress.saw(i);
                                Watch::Fine
                            }
                        }
                    }
                };
            }
        }
    })
}

async fn counters(client: &EngineClient, url: &str, kind: tether_fleet::EngineKind) -> Option<f64> {
    let text = metrics_text(client, url, Duration::from_secs(2)).await?;
    tokens_processed(&text, kind)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_engine_is_quiet_only_while_calls_wait_on_it() {
        let p = Progress::new(2);
        assert_eq!(p.quiet_for(0), None);
        let w = p.wait(0);
        assert!(p.quiet_for(0).is_some());
        assert_eq!(p.quiet_for(1), None);
        let w2 = p.wait(0);
        drop(w);
        assert!(p.quiet_for(0).is_some(), "one still waits");
        drop(w2);
        assert_eq!(p.quiet_for(0), None);
        // Unknown engines are never quiet, and waiting on one is harmless.
        let _w = p.wait(9);
        assert_eq!(p.quiet_for(9), None);
    }

    #[test]
    fn the_first_waiter_starts_the_clock() {
        let p = Progress::new(1);
        std::thread::sleep(Duration::from_millis(30));
        let waited_from = Instant::now();
        let _w = p.wait(0);
        let q = p.quiet_for(0).unwrap_or(Duration::MAX);
        // Counted from the wait (ms rounding aside), not from the start.
        assert!(
            q <= waited_from.elapsed() + Duration::from_millis(1),
            "{q:?}: an idle engine is not quiet"
        );
    }
}
