//! The gateway queue, live: [`tether_policy::GateQueue`] (the pure rules —
//! per-engine limits, order by level then arrival, the starvation bound,
//! late binding) behind one lock, with the grants delivered to the waiting
//! calls.
//!
//! A call asks for a slot with the engine the scheduler preferred and its
//! bind delay. It runs at once, waits, or is refused (429). While it waits,
//! a timer fires at its bind deadline so that it can take a free slot on any
//! candidate engine. A client that disconnects while queued leaves the queue
//! and holds nothing; a slot granted to a call that went away at that very
//! moment is handed on, so no slot is ever lost.
//!
//! Time: the queue's clock is wall seconds since the gateway started.
//! Service, bind delays and the starvation floor are estimated *engine*
//! seconds; with `time_scale` > 1 (simulated engines running faster than
//! real time) they are divided by it.
//!
//! With several ingress replicas, each holds `⌈limit / replicas⌉` of an
//! engine's slots (`--ingress-replicas`), so together they respect the limit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tether_policy::{Ask, GateConfig, GateQueue, Grant, Offer};
use tokio::sync::oneshot;
use tokio::time::{Duration, Instant};

#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    QueueFull,
}

struct Inner {
    queue: GateQueue,
    senders: HashMap<u64, oneshot::Sender<Grant>>,
}

/// The gateway's slots on every engine and the calls waiting for them.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Mutex<Inner>>,
    epoch: Instant,
    time_scale: f64,
}

/// A held slot on [`Permit::engine`]; handed to the next eligible waiter
/// when dropped.
pub struct Permit {
    gateway: Gateway,
    engine: usize,
    /// The prefill tokens this call stages on its engine until its first
    /// token ([`Permit::started`]); `None` once started, or never staged.
    staged: Option<f64>,
}

impl Permit {
    /// The engine this slot is on (late binding may have moved the call off
    /// the scheduler's choice).
    pub fn engine(&self) -> usize {
        self.engine
    }

    /// The engine answered with the call's first token: it is no longer
    /// staged, and the engine may take another call. Later calls do nothing.
    pub fn started(&mut self) {
        let Some(stage) = self.staged.take() else {
            return;
        };
        let mut g = self.gateway.lock();
        let now = self.gateway.now();
        let grants = g.queue.started(self.engine, stage, now);
        Gateway::deliver(&mut g, now, grants);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut g = self.gateway.lock();
        let now = self.gateway.now();
        let grants = g.queue.release(self.engine, self.staged.take(), now);
        Gateway::deliver(&mut g, now, grants);
    }
}

/// What a call asks of the gateway (service and delay in engine seconds).
#[derive(Clone, Debug)]
pub struct Request {
    pub level: u8,
    pub service: f64,
    /// The call's uncached prefill, engine seconds (see [`Ask::size`]).
    pub size: f64,
    pub preferred: usize,
    pub bind_delay: f64,
    pub candidates: Vec<usize>,
    /// The prefill tokens the call stages on its engine until its first
    /// token (see [`Ask::stage`]); `None` when not streamed.
    pub stage: Option<f64>,
}

/// Removes a waiter that is dropped before its grant arrived; returns a
/// grant that raced with the drop.
struct Waiting {
    gateway: Gateway,
    id: u64,
    rx: oneshot::Receiver<Grant>,
    done: bool,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut g = self.gateway.lock();
        g.senders.remove(&self.id);
        if g.queue.cancel(self.id) {
            return;
        }
        // Granted while the client went away: the slot goes on.
        if let Ok(grant) = self.rx.try_recv() {
            let now = self.gateway.now();
            let grants = g.queue.release(grant.engine, grant.stage, now);
            Gateway::deliver(&mut g, now, grants);
        }
    }
}

impl Gateway {
    /// `limits`: each engine's initial limit (this replica's share).
    /// `cfg.service_floor` is in engine seconds.
    pub fn new(limits: &[usize], cfg: GateConfig, time_scale: f64) -> Self {
        let time_scale = if time_scale.is_finite() && time_scale > 0.0 {
            time_scale
        } else {
            1.0
        };
        let cfg = GateConfig {
            service_floor: cfg.service_floor / time_scale,
            ..cfg
        };
        Self {
            inner: Arc::new(Mutex::new(Inner {
                queue: GateQueue::new(limits, cfg),
                senders: HashMap::new(),
            })),
            epoch: Instant::now(),
            time_scale,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is a few counters and maps, each operation leaves it
        // consistent before anything can panic: take a poisoned lock over.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    /// Sends grants to their waiters; a grant whose waiter is gone frees its
    /// slot again, which may grant another.
    fn deliver(g: &mut Inner, now: f64, mut grants: Vec<Grant>) {
        while let Some(grant) = grants.pop() {
            let sent = g
                .senders
                .remove(&grant.id)
                .is_some_and(|tx| tx.send(grant).is_ok());
            if !sent {
                grants.extend(g.queue.release(grant.engine, grant.stage, now));
            }
        }
    }

    /// (in use, limit, waiting) of one engine — for metrics, control and tests.
    pub fn usage(&self, engine: usize) -> (usize, usize, usize) {
        self.lock().queue.usage(engine)
    }

    /// (staged calls, staged prefill tokens) of one engine.
    pub fn staged(&self, engine: usize) -> (usize, f64) {
        self.lock().queue.staged(engine)
    }

    /// Calls waiting in all.
    pub fn waiting(&self) -> usize {
        self.lock().queue.waiting()
    }

    /// Sets an engine's limit (capacity control); a raised limit admits waiters.
    pub fn set_limit(&self, engine: usize, limit: usize) {
        let mut g = self.lock();
        let now = self.now();
        let grants = g.queue.set_limit(engine, limit, now);
        Gateway::deliver(&mut g, now, grants);
    }

    /// Serves the waiters whose bind delay ran out.
    fn expire(&self) {
        let mut g = self.lock();
        let now = self.now();
        let grants = g.queue.expire(now);
        Gateway::deliver(&mut g, now, grants);
    }

    /// Takes a slot for call `id`, waiting in the queue if none is free.
    pub async fn acquire(&self, id: u64, r: Request) -> Result<Permit, Refused> {
        let ask = Ask {
            level: r.level,
            service: r.service / self.time_scale,
            size: r.size / self.time_scale,
            preferred: r.preferred,
            bind_delay: r.bind_delay / self.time_scale,
            candidates: r.candidates,
            stage: r.stage,
        };
        let stage = ask.stage;
        let bind_delay = ask.bind_delay;
        let rx = {
            let mut g = self.lock();
            let now = self.now();
            let grants = g.queue.expire(now);
            Gateway::deliver(&mut g, now, grants);
            match g.queue.offer(id, ask, now) {
                Offer::Run(engine) => {
                    return Ok(Permit {
                        gateway: self.clone(),
                        engine,
                        staged: stage,
                    });
                }
                Offer::Full => return Err(Refused::QueueFull),
                Offer::Queued => {
                    let (tx, rx) = oneshot::channel();
                    g.senders.insert(id, tx);
                    rx
                }
            }
        };
        let mut waiting = Waiting {
            gateway: self.clone(),
            id,
            rx,
            done: false,
        };
        let deadline = (bind_delay.is_finite() && bind_delay > 0.0)
            .then(|| Instant::now() + Duration::from_secs_f64(bind_delay.min(1e6)));
        let mut timer_armed = deadline.is_some();
        let sleep = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now));
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                got = &mut waiting.rx => {
                    waiting.done = true;
                    return match got {
                        Ok(grant) => Ok(Permit {
                            gateway: self.clone(),
                            engine: grant.engine,
                            staged: grant.stage,
                        }),
                        // The sender went away without a grant: only when
                        // the gateway itself is dropped (shutdown).
                        Err(_) => Err(Refused::QueueFull),
                    };
                }
                () = &mut sleep, if timer_armed => {
                    timer_armed = false;
                    self.expire();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gw(limits: &[usize], beta: f64) -> Gateway {
        Gateway::new(
            limits,
            GateConfig {
                max_queue: 8,
                queue_starvation_ratio: beta,
                service_floor: 1.0,
                size_ratio: 0.0,
                stage_calls: 0,
                stage_tokens: 0.0,
                decode_balance: 0,
                step_tokens: 8192.0,
            },
            1.0,
        )
    }

    fn req(level: u8, preferred: usize, bind_delay: f64, n: usize) -> Request {
        Request {
            level,
            service: 0.0,
            size: 0.0,
            preferred,
            bind_delay,
            candidates: (0..n).collect(),
            stage: None,
        }
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn lower_levels_overtake_and_fifo_within_a_level() {
        let gate = gw(&[1], 0.0);
        let first = gate.acquire(1, req(3, 0, 1.0, 1)).await;
        assert!(first.is_ok());
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (id, (name, level)) in [("heavy", 4u8), ("light-a", 0), ("light-b", 0), ("mid", 2)]
            .into_iter()
            .enumerate()
        {
            let (g, o) = (gate.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let p = g.acquire(10 + id as u64, req(level, 0, 1.0, 1)).await;
                o.lock().unwrap_or_else(|p| p.into_inner()).push(name);
                drop(p);
            }));
            settle().await;
        }
        assert_eq!(gate.usage(0), (1, 1, 4));
        drop(first);
        for t in tasks {
            let _ = t.await;
        }
        assert_eq!(
            *order.lock().unwrap_or_else(|p| p.into_inner()),
            vec!["light-a", "light-b", "mid", "heavy"]
        );
        assert_eq!(gate.usage(0), (0, 1, 0));
    }

    #[tokio::test]
    async fn a_full_queue_refuses_and_cancelled_waiters_hold_nothing() {
        let gate = Gateway::new(
            &[1],
            GateConfig {
                max_queue: 1,
                ..GateConfig::default()
            },
            1.0,
        );
        let held = gate.acquire(1, req(0, 0, 1.0, 1)).await;
        assert!(held.is_ok());
        let g = gate.clone();
        let queued = tokio::spawn(async move { g.acquire(2, req(0, 0, 1.0, 1)).await.map(|_| ()) });
        settle().await;
        assert!(matches!(
            gate.acquire(3, req(0, 0, 1.0, 1)).await,
            Err(Refused::QueueFull)
        ));
        // The queued client goes away: its place frees, and it takes no slot.
        queued.abort();
        let _ = queued.await;
        assert_eq!(gate.usage(0), (1, 1, 0));
        drop(held);
        assert_eq!(gate.usage(0), (0, 1, 0));
        assert!(gate.acquire(4, req(0, 0, 1.0, 1)).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_moves_to_an_idle_engine_after_its_delay() {
        let gate = gw(&[1, 1], 2.0);
        let busy = gate.acquire(1, req(0, 0, 0.5, 2)).await;
        assert_eq!(busy.as_ref().map(Permit::engine).ok(), Some(0));
        let started = Instant::now();
        let moved = gate.acquire(2, req(0, 0, 0.5, 2)).await;
        assert_eq!(moved.as_ref().map(Permit::engine).ok(), Some(1));
        assert!(started.elapsed() >= Duration::from_millis(500));
        assert!(started.elapsed() < Duration::from_millis(600));
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_call_whose_engine_frees_in_time_stays() {
        let gate = gw(&[1, 1], 2.0);
        let busy = gate.acquire(1, req(0, 0, 1.0, 2)).await;
        let g = gate.clone();
        let waiter =
            tokio::spawn(async move { g.acquire(2, req(0, 0, 1.0, 2)).await.map(|p| p.engine()) });
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(busy);
        assert_eq!(waiter.await.ok().and_then(Result::ok), Some(0));
    }

    #[tokio::test(start_paused = true)]
    async fn starving_calls_are_promoted() {
        let gate = gw(&[1], 2.0);
        let held = gate.acquire(1, req(0, 0, f64::INFINITY, 1)).await;
        let order = Arc::new(Mutex::new(Vec::new()));
        // An old call of a heavy session (service 1 s → starving after 2 s)…
        let (g, o) = (gate.clone(), order.clone());
        let old = tokio::spawn(async move {
            let r = Request {
                service: 1.0,
                ..req(4, 0, f64::INFINITY, 1)
            };
            let _p = g.acquire(2, r).await;
            o.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push("old-heavy");
        });
        settle().await;
        tokio::time::advance(Duration::from_secs(3)).await;
        // …then a fresh light call, which would overtake it were it not starving.
        let (g, o) = (gate.clone(), order.clone());
        let fresh = tokio::spawn(async move {
            let _p = g.acquire(3, req(1, 0, f64::INFINITY, 1)).await;
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

    /// Fresh short calls keep arriving; a heavy session's call is still
    /// dispatched within the bound β·max(service, floor) plus one holder's time.
    #[tokio::test(start_paused = true)]
    async fn a_heavy_session_is_not_starved_by_a_stream_of_fresh_ones() {
        let beta = 2.0;
        let gate = gw(&[1], beta);
        let hold = Duration::from_secs(1);
        let g = gate.clone();
        let stream = tokio::spawn(async move {
            let mut id = 100u64;
            loop {
                let g2 = g.clone();
                id += 1;
                let this = id;
                tokio::spawn(async move {
                    if let Ok(p) = g2.acquire(this, req(0, 0, f64::INFINITY, 1)).await {
                        tokio::time::sleep(hold).await;
                        drop(p);
                    }
                });
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let service = 30.0;
        let queued_at = Instant::now();
        let permit = gate
            .acquire(
                1,
                Request {
                    service,
                    ..req(4, 0, f64::INFINITY, 1)
                },
            )
            .await;
        let waited = queued_at.elapsed();
        assert!(permit.is_ok());
        let bound = Duration::from_secs_f64(beta * f64::max(service, 1.0)) + hold;
        assert!(waited <= bound, "waited {waited:?}, bound {bound:?}");
        assert!(
            waited >= Duration::from_secs_f64(beta * service) - hold,
            "waited only {waited:?}"
        );
        stream.abort();
    }

    #[tokio::test]
    async fn raising_a_limit_admits_waiters() {
        let gate = gw(&[1], 0.0);
        let held = gate.acquire(1, req(0, 0, f64::INFINITY, 1)).await;
        let g = gate.clone();
        let waiter = tokio::spawn(async move {
            g.acquire(2, req(0, 0, f64::INFINITY, 1))
                .await
                .map(|p| p.engine())
        });
        settle().await;
        assert_eq!(gate.usage(0), (1, 1, 1));
        gate.set_limit(0, 2);
        assert_eq!(waiter.await.ok().and_then(Result::ok), Some(0));
        drop(held);
        assert_eq!(gate.usage(0), (0, 2, 0));
    }

    #[tokio::test]
    async fn a_staged_engine_takes_more_calls_after_a_first_token() {
        let gate = Gateway::new(
            &[256],
            GateConfig {
                stage_calls: 1,
                stage_tokens: 0.0,
                decode_balance: 0,
                step_tokens: 8192.0,
                queue_starvation_ratio: 0.0,
                ..GateConfig::default()
            },
            1.0,
        );
        let staged = || Request {
            stage: Some(100.0),
            ..req(0, 0, f64::INFINITY, 1)
        };
        let mut first = gate.acquire(1, staged()).await.ok();
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.acquire(2, staged()).await.map(|p| p.engine()) });
        settle().await;
        // One staged call: the second waits though the engine has 255 seats.
        assert_eq!(gate.usage(0), (1, 256, 1));
        assert_eq!(gate.staged(0), (1, 100.0));
        if let Some(p) = first.as_mut() {
            p.started();
            // A second first token changes nothing.
            p.started();
        }
        assert_eq!(waiter.await.ok().and_then(Result::ok), Some(0));
        // The waiter's permit was dropped with it, staged: nothing stays staged.
        assert_eq!(gate.staged(0), (0, 0.0));
        drop(first);
        assert_eq!(gate.usage(0), (0, 256, 0));
    }
}
