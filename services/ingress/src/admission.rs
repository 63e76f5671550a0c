//! The gateway-side priority queue: each engine takes at most its
//! concurrency limit of calls from this ingress; calls beyond it wait here,
//! ordered by level, then arrival (FIFO within a level).
//!
//! Anti-starvation: a waiting call whose wait reaches
//! `β · max(service, floor)` (its session's service when it was queued) is
//! served as if it were level 0; among level-0 calls the earliest arrival
//! goes first, so such a call waits at most for the calls that were already
//! level 0 or starving ahead of it.
//!
//! The queue is bounded: when full, the call is refused (429 with
//! `Retry-After`). A client that disconnects while queued drops its waiter;
//! the waiter is skipped when its turn comes, and it never held a slot.
//!
//! With several ingress replicas, each holds `⌈limit / replicas⌉` of an
//! engine's slots (`--ingress-replicas`), so together they respect the limit.

use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug)]
pub struct AdmissionConfig {
    /// Most calls waiting per engine.
    pub max_queue: usize,
    /// β of anti-starvation (0 disables).
    pub starvation_ratio: f64,
    /// Floor of the service in the starvation bound, seconds.
    pub service_floor: f64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    QueueFull,
}

struct Waiter {
    level: u8,
    seq: u64,
    arrived: Instant,
    /// When this waiter starts to count as starving.
    starving_after: Duration,
    tx: oneshot::Sender<()>,
}

struct Gate {
    limit: usize,
    in_use: usize,
    waiting: Vec<Waiter>,
    seq: u64,
}

/// One engine's slots.
#[derive(Clone)]
pub struct EngineGate {
    inner: Arc<Mutex<Gate>>,
    cfg: AdmissionConfig,
}

/// A held slot; released (or handed to the next waiter) when dropped.
pub struct Permit {
    gate: EngineGate,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gate.release();
    }
}

impl EngineGate {
    pub fn new(limit: usize, cfg: AdmissionConfig) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Gate {
                limit: limit.max(1),
                in_use: 0,
                waiting: Vec::new(),
                seq: 0,
            })),
            cfg,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Gate> {
        // A panic while holding this lock cannot leave the gate inconsistent
        // beyond a slot count, so a poisoned lock is taken over.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (in use, waiting) — for metrics and tests.
    pub fn usage(&self) -> (usize, usize) {
        let g = self.lock();
        (
            g.in_use,
            g.waiting.iter().filter(|w| !w.tx.is_closed()).count(),
        )
    }

    /// Takes a slot, waiting in the queue if none is free. `service` is the
    /// session's service (seconds) behind `level`, for anti-starvation.
    pub async fn acquire(&self, level: u8, service: f64) -> Result<Permit, Refused> {
        let rx = {
            let mut g = self.lock();
            if g.in_use < g.limit && g.waiting.iter().all(|w| w.tx.is_closed()) {
                g.waiting.clear();
                g.in_use += 1;
                return Ok(Permit { gate: self.clone() });
            }
            if g.waiting.len() >= self.cfg.max_queue {
                g.waiting.retain(|w| !w.tx.is_closed());
                if g.waiting.len() >= self.cfg.max_queue {
                    return Err(Refused::QueueFull);
                }
            }
            let (tx, rx) = oneshot::channel();
            g.seq += 1;
            let seq = g.seq;
            let starving_after = if self.cfg.starvation_ratio > 0.0 {
                Duration::from_secs_f64(
                    (self.cfg.starvation_ratio * service.max(self.cfg.service_floor))
                        .clamp(0.0, 1e9),
                )
            } else {
                Duration::MAX
            };
            g.waiting.push(Waiter {
                level,
                seq,
                arrived: Instant::now(),
                starving_after,
                tx,
            });
            rx
        };
        match rx.await {
            // The releasing call handed its slot over: in_use already counts us.
            Ok(()) => Ok(Permit { gate: self.clone() }),
            // The gate is gone (shutdown): treat as full.
            Err(_) => Err(Refused::QueueFull),
        }
    }

    fn release(&self) {
        let mut g = self.lock();
        let now = Instant::now();
        loop {
            let next = g
                .waiting
                .iter()
                .enumerate()
                .filter(|(_, w)| !w.tx.is_closed())
                .min_by_key(|(_, w)| {
                    let level = if now.duration_since(w.arrived) >= w.starving_after {
                        0
                    } else {
                        w.level
                    };
                    (level, w.seq)
                })
                .map(|(i, _)| i);
            let Some(i) = next else {
                g.waiting.clear();
                g.in_use = g.in_use.saturating_sub(1);
                return;
            };
            let w = g.waiting.swap_remove(i);
            if w.tx.send(()).is_ok() {
                return; // the slot passes to the waiter
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AdmissionConfig {
        AdmissionConfig {
            max_queue: 8,
            starvation_ratio: 0.0,
            service_floor: 1.0,
        }
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn lower_levels_overtake_and_fifo_within_a_level() {
        let gate = EngineGate::new(1, cfg());
        let first = gate.acquire(3, 0.0).await;
        assert!(first.is_ok());
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, level) in [("heavy", 4u8), ("light-a", 0), ("light-b", 0), ("mid", 2)] {
            let (g, o) = (gate.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = g.acquire(level, 0.0).await;
                o.lock().unwrap_or_else(|p| p.into_inner()).push(name);
                drop(p);
            }));
            settle().await;
        }
        assert_eq!(gate.usage(), (1, 4));
        drop(first);
        for t in tasks {
            let _ = t.await;
        }
        assert_eq!(
            *order.lock().unwrap_or_else(|p| p.into_inner()),
            vec!["light-a", "light-b", "mid", "heavy"]
        );
        assert_eq!(gate.usage(), (0, 0));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_cancelled_waiters_hold_nothing() {
        let gate = EngineGate::new(
            1,
            AdmissionConfig {
                max_queue: 1,
                ..cfg()
            },
        );
        let held = gate.acquire(0, 0.0).await;
        assert!(held.is_ok());
        let g = gate.clone();
        let queued = tokio::spawn(async move { g.acquire(0, 0.0).await.map(|_| ()) });
        settle().await;
        assert_eq!(gate.acquire(0, 0.0).await.err(), Some(Refused::QueueFull));
        // The queued client goes away: its place frees, and it takes no slot.
        queued.abort();
        let _ = queued.await;
        assert_eq!(gate.usage(), (1, 0));
        drop(held);
        assert_eq!(gate.usage(), (0, 0));
        assert!(gate.acquire(0, 0.0).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn starving_calls_are_promoted() {
        let gate = EngineGate::new(
            1,
            AdmissionConfig {
                starvation_ratio: 2.0,
                ..cfg()
            },
        );
        let held = gate.acquire(0, 0.0).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        // An old call of a heavy session (service 1 s → starving after 2 s)…
        let (g, o) = (gate.clone(), order.clone());
        let old = tokio::spawn(async move {
            let _p = g.acquire(4, 1.0).await;
            o.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push("old-heavy");
        });
        settle().await;
        tokio::time::advance(Duration::from_secs(3)).await;
        // …then a fresh light call, which would overtake it were it not starving.
        let (g, o) = (gate.clone(), order.clone());
        let fresh = tokio::spawn(async move {
            let _p = g.acquire(1, 0.0).await;
            o.lock().unwrap_or_else(|p| p.into_inner()).push("fresh");
        });
        settle().await;
        drop(held);
        let _ = (old.await, fresh.await);
        assert_eq!(
            *order.lock().unwrap_or_else(|p| p.into_inner()),
            vec!["old-heavy", "fresh"]
        );
    }

    /// A long-running session keeps calling while fresh short sessions keep
    /// arriving; its call is still dispatched within the stated bound:
    /// β·max(service, floor) plus one holder's service time.
    #[tokio::test(start_paused = true)]
    async fn a_heavy_session_is_not_starved_by_a_stream_of_fresh_ones() {
        let beta = 2.0;
        let gate = EngineGate::new(
            1,
            AdmissionConfig {
                starvation_ratio: beta,
                ..cfg()
            },
        );
        let hold = Duration::from_secs(1);
        let start = Instant::now();
        // Fresh level-0 calls arrive every 0.5 s forever, each holding the slot 1 s.
        let g = gate.clone();
        let stream = tokio::spawn(async move {
            loop {
                let g2 = g.clone();
                tokio::spawn(async move {
                    if let Ok(p) = g2.acquire(0, 0.0).await {
                        tokio::time::sleep(hold).await;
                        drop(p);
                    }
                });
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        // The heavy session's call: service 30 s, level 4.
        let service = 30.0;
        let queued_at = Instant::now();
        let permit = gate.acquire(4, service).await;
        let waited = queued_at.elapsed();
        assert!(permit.is_ok());
        let bound = Duration::from_secs_f64(beta * f64::max(service, 1.0)) + hold;
        assert!(waited <= bound, "waited {waited:?}, bound {bound:?}");
        // And it really had to wait for the promotion: fresh calls overtook it.
        assert!(
            waited >= Duration::from_secs_f64(beta * service) - hold,
            "waited only {waited:?}"
        );
        assert!(start.elapsed() > waited);
        stream.abort();
    }
}
