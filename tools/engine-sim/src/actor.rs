//! The engine task: owns the [`Engine`], takes requests from its mailbox and
//! runs steps, sleeping so that simulated time runs `time_scale` times as
//! fast as wall time. Sleeps aim at an absolute deadline computed from the
//! engine's clock, so timer granularity does not accumulate over many short
//! steps. Idle, it waits for work without spinning.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tether_telemetry::Shutdown;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::SimConfig;
use crate::engine::{AddError, Engine, Output, Request, SeqId, Usage};
use crate::kv_events::Batch;
use crate::metrics::Metrics;

/// What a request's client receives.
#[derive(Debug)]
pub enum Event {
    Token(&'static str),
    Done(Usage),
}

pub struct Submit {
    pub request: Request,
    pub events: mpsc::UnboundedSender<Event>,
    pub accepted: oneshot::Sender<Result<(), AddError>>,
}

/// What the engine task's mailbox takes.
pub enum Command {
    Submit(Submit),
    /// Drop the prefix cache (vLLM's `/reset_prefix_cache`); answers
    /// whether it did (not while sequences hold blocks).
    ResetPrefixCache(oneshot::Sender<bool>),
    /// The hashes of every cached block (for tests that compare an index
    /// against what the engine holds).
    CachedBlocks(oneshot::Sender<Vec<u64>>),
}

#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
}

impl EngineHandle {
    /// Submits a request; its events arrive on the returned receiver.
    pub async fn submit(
        &self,
        request: Request,
    ) -> Result<mpsc::UnboundedReceiver<Event>, AddError> {
        let (events, rx) = mpsc::unbounded_channel();
        let (accepted, ok) = oneshot::channel();
        if self
            .tx
            .send(Command::Submit(Submit {
                request,
                events,
                accepted,
            }))
            .await
            .is_err()
        {
            return Err(AddError::Stopped);
        }
        match ok.await {
            Ok(Ok(())) => Ok(rx),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(AddError::Stopped),
        }
    }
}

impl EngineHandle {
    /// Drops the prefix cache; false if sequences hold blocks (or the engine
    /// is stopping).
    pub async fn reset_prefix_cache(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::ResetPrefixCache(tx)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// The hashes of every block cached now; empty if the engine is stopping.
    pub async fn cached_blocks(&self) -> Vec<u64> {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::CachedBlocks(tx)).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }
}

/// Starts the engine task. With `kv_events`, every change to the prefix
/// cache goes there, one batch per step.
pub fn spawn(
    cfg: SimConfig,
    metrics: Arc<Metrics>,
    shutdown: Shutdown,
    kv_events: Option<mpsc::UnboundedSender<Batch>>,
) -> EngineHandle {
    let (tx, rx) = mpsc::channel(1024);
    tokio::spawn(run(cfg, metrics, rx, shutdown, kv_events));
    EngineHandle { tx }
}

/// Sends the cache events since the last call, if any, as one batch.
fn flush_kv_events(engine: &mut Engine, kv_events: Option<&mpsc::UnboundedSender<Batch>>) {
    let Some(tx) = kv_events else {
        return;
    };
    let events = engine.take_kv_events();
    if events.is_empty() {
        return;
    }
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let _ = tx.send(Batch { ts, events });
}

async fn run(
    cfg: SimConfig,
    metrics: Arc<Metrics>,
    mut rx: mpsc::Receiver<Command>,
    shutdown: Shutdown,
    kv_events: Option<mpsc::UnboundedSender<Batch>>,
) {
    let scale = if cfg.time_scale.is_finite() && cfg.time_scale > 0.0 {
        cfg.time_scale
    } else {
        1.0
    };
    let mut engine = Engine::new(cfg);
    if kv_events.is_some() {
        engine.record_kv_events();
    }
    let mut sinks: HashMap<SeqId, mpsc::UnboundedSender<Event>> = HashMap::new();
    let start = Instant::now();
    let sim_now = || start.elapsed().as_secs_f64() * scale;
    loop {
        // Idle: wait for work; the clock follows wall time meanwhile.
        if engine.is_idle() {
            let submit = tokio::select! {
                _ = shutdown.cancelled() => return,
                s = rx.recv() => match s { Some(s) => s, None => return },
            };
            engine.advance_to(sim_now());
            accept(
                &mut engine,
                &mut sinks,
                submit,
                &metrics,
                kv_events.as_ref(),
            );
        }
        while let Ok(submit) = rx.try_recv() {
            accept(
                &mut engine,
                &mut sinks,
                submit,
                &metrics,
                kv_events.as_ref(),
            );
        }
        // Clients that went away.
        let gone: Vec<SeqId> = sinks
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            sinks.remove(&id);
            engine.abort(id);
        }
        let step = engine.step();
        flush_kv_events(&mut engine, kv_events.as_ref());
        let Some(step) = step else {
            publish(&engine, &metrics);
            if !engine.is_idle() {
                // Work that cannot be scheduled yet (no room): wait for a change.
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(1)) => {}
                }
            }
            continue;
        };
        let deadline = start + Duration::from_secs_f64(engine.now() / scale);
        if deadline > Instant::now() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep_until(deadline) => {}
            }
        } else {
            // Behind schedule (a fast time scale, or a busy machine): catch up.
            let behind = Instant::now().duration_since(deadline).as_secs_f64() * scale;
            metrics.observe_lag(behind);
            tokio::task::yield_now().await;
        }
        for out in step.outputs {
            match out {
                Output::Token { seq, word, .. } => {
                    if sinks
                        .get(&seq)
                        .is_some_and(|tx| tx.send(Event::Token(word)).is_err())
                    {
                        sinks.remove(&seq);
                        engine.abort(seq);
                    }
                }
                Output::Finished { seq, usage, timing } => {
                    metrics.observe_finished(&timing, usage.completion_tokens);
                    if let Some(tx) = sinks.remove(&seq) {
                        let _ = tx.send(Event::Done(usage));
                    }
                }
            }
        }
        publish(&engine, &metrics);
    }
}

fn accept(
    engine: &mut Engine,
    sinks: &mut HashMap<SeqId, mpsc::UnboundedSender<Event>>,
    command: Command,
    metrics: &Metrics,
    kv_events: Option<&mpsc::UnboundedSender<Batch>>,
) {
    let s = match command {
        Command::Submit(s) => s,
        Command::ResetPrefixCache(done) => {
            let ok = engine.reset_prefix_cache();
            flush_kv_events(engine, kv_events);
            let _ = done.send(ok);
            return;
        }
        Command::CachedBlocks(out) => {
            let _ = out.send(engine.kv().hashes());
            return;
        }
    };
    match engine.add(s.request) {
        Ok(id) => {
            sinks.insert(id, s.events);
            let _ = s.accepted.send(Ok(()));
        }
        Err(e) => {
            let _ = s.accepted.send(Err(e));
        }
    }
    publish(engine, metrics);
}

fn publish(engine: &Engine, metrics: &Metrics) {
    metrics.set_engine(
        engine.num_running(),
        engine.num_waiting(),
        engine.kv_usage(),
        engine.stats,
    );
}
