//! Running a routed call on an engine: wait for a slot at the gateway, send
//! the call, and — while no byte has reached the client — try another
//! engine when the one chosen fails (connect error, 5xx, no response
//! headers in time, or a stream whose first data does not come in time).
//!
//! The gateway's wait is where late binding happens: a call waits for the
//! scheduler's engine, or — once it has waited longer than its cache there
//! would save — takes any engine with room. A client that goes away
//! meanwhile drops the tracker, which reports the call cancelled.

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use std::time::{Duration, Instant};
use tether_protocol::{CallId, Outcome};

use crate::admission::{Refused, Request};
use crate::breaker::Verdict;
use crate::errors::ApiError;
use crate::metrics::label;
use crate::proxy::{FirstFrame, Primed};
use crate::request::{CallBody, Endpoint};
use crate::routing::Route;
use crate::service::App;
use crate::tracker::Tracker;

/// The engine that answered, with its response head and body.
pub struct Answered {
    pub engine: usize,
    pub parts: http::response::Parts,
    pub body: Primed,
}

/// Most bytes of an engine's error body kept for the client's message.
const ERROR_BODY_LIMIT: usize = 64 * 1024;

/// Reads an engine's error body (bounded); empty if it cannot be read.
pub async fn error_body<B>(body: B) -> Bytes
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Limited::new(body, ERROR_BODY_LIMIT)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default()
}

/// The gateway's ask for the routed call.
fn ask(app: &App, route: &mut Route, call: &CallBody) -> Request {
    // The prefill the call brings to its engine: its prompt, less what the
    // scheduler expects that engine's cache to save (the bind delay; none
    // known for the baselines, whose bind delay is infinite).
    let prompt_tokens = (call.raw_len() / 4) as f64;
    let prefill = app.cost.prefill_per_token * prompt_tokens;
    let size = if route.bind_delay.is_finite() {
        (prefill - route.bind_delay).max(0.0)
    } else {
        prefill
    };
    // What it stages on its engine until its first token: the uncached
    // prompt, in tokens (a non-streamed call is never counted as staged).
    let uncached = if app.cost.prefill_per_token > 0.0 {
        size / app.cost.prefill_per_token
    } else {
        prompt_tokens
    };
    Request {
        level: route.level,
        service: route.service,
        size,
        preferred: route.engine,
        bind_delay: route.bind_delay,
        candidates: std::mem::take(&mut route.candidates),
        stage: call.stream.then_some(uncached),
    }
}

/// How long an engine may take to send its response headers: the
/// time-to-first-byte bound for streams; the whole call's bound otherwise
/// (an engine sends a non-streamed answer's headers with the answer).
fn header_timeout(app: &App, stream: bool) -> Duration {
    if stream {
        Duration::from_secs_f64(
            app.engine_ttfb_timeout_secs
                .min(app.engine_timeout_secs as f64)
                .max(0.001),
        )
    } else {
        Duration::from_secs(app.engine_timeout_secs)
    }
}

/// One try on one engine: its answer, or why it failed while nothing has
/// reached the client. A 200 stream counts as started only with its first
/// frame, and that must come within the time-to-first-byte bound too: an
/// engine that sends its headers at once and then hangs (still passing
/// `/health`) is caught here, and the call retried. So is an engine that
/// turns unhealthy, or that the stall watchdog marks, while the call waits
/// ([`crate::stall`]).
async fn attempt(
    app: &App,
    engine: usize,
    endpoint: Endpoint,
    body: Bytes,
    timeout: Duration,
    stream: bool,
) -> Result<(http::response::Parts, Primed), (ApiError, &'static str)> {
    let sent = Instant::now();
    let name = &app.fleet.engines[engine].name;
    // An engine that turns unhealthy or stalls while the call waits for its
    // answer to begin: the call is retried elsewhere at once, instead of
    // waiting out its timeout (a non-streamed call's is the whole answer's).
    let gone = || {
        (
            ApiError::engine_failed(format!(
                "engine {name} became unhealthy while the call waited for its answer"
            )),
            "unhealthy",
        )
    };
    let _waiting = app.progress.wait(engine);
    // One watch for the whole wait, headers and first frame alike.
    let unhealthy = app.health.turned_unhealthy(engine);
    tokio::pin!(unhealthy);
    let resp = tokio::select! {
        resp = crate::proxy::forward(app, engine, endpoint, body, timeout) => resp?,
        () = &mut unhealthy => return Err(gone()),
    };
    app.progress.saw(engine);
    let (parts, body) = resp.into_parts();
    if parts.status.is_server_error() {
        let bytes = error_body(body).await;
        let err = ApiError::engine_failed(format!(
            "engine {name} answered {}: {}",
            parts.status,
            String::from_utf8_lossy(&bytes)
                .chars()
                .take(512)
                .collect::<String>()
        ));
        return Err((err, "status"));
    }
    if !(stream && parts.status.is_success()) {
        return Ok((parts, Primed::new(body)));
    }
    let left = timeout.saturating_sub(sent.elapsed());
    let first = tokio::select! {
        first = Primed::first_frame(body, left) => first,
        () = &mut unhealthy => return Err(gone()),
    };
    match first {
        Ok(body) => {
            app.progress.saw(engine);
            Ok((parts, body))
        }
        Err(FirstFrame::Late) => Err((
            ApiError::engine_failed(format!(
                "engine {name} sent no stream data within {:.1} s",
                timeout.as_secs_f64()
            )),
            "timeout",
        )),
        Err(FirstFrame::Broken(err)) => Err((
            ApiError::engine_failed(format!(
                "engine {name} broke off the stream before its first byte: {err}"
            )),
            "connect",
        )),
    }
}

/// Waits for a slot, sends the call, retries on another engine while no
/// byte has reached the client. Every error path has reported the call's
/// end to `tracker`.
pub async fn run(
    app: &App,
    call_id: CallId,
    session: u64,
    endpoint: Endpoint,
    call: &CallBody,
    route: &mut Route,
    tracker: &mut Tracker,
) -> Result<Answered, ApiError> {
    let span = tracing::Span::current();
    let mut ask = ask(app, route, call);
    let all_candidates = ask.candidates.clone();
    let timeout = header_timeout(app, call.stream);
    // Engines tried and failed, before any byte reached the client.
    let mut failed: Vec<usize> = Vec::new();
    loop {
        let queued_at = Instant::now();
        let (size, stage) = (ask.size, ask.stage);
        let engine = match app.gateway.acquire(call_id, ask).await {
            Ok(permit) => {
                span.record(
                    "tether.queue.wait_seconds",
                    queued_at.elapsed().as_secs_f64(),
                );
                let engine = permit.engine();
                let binding = if !failed.is_empty() {
                    "retried"
                } else if engine == route.engine {
                    "preferred"
                } else {
                    "moved"
                };
                app.metrics
                    .bindings
                    .get_or_create(&[("binding", binding)])
                    .inc();
                tracker.dispatch(permit);
                engine
            }
            Err(Refused::QueueFull) => {
                app.metrics.refused.inc();
                tracker.finish(Outcome::Refused);
                return Err(ApiError::queue_full(&app.fleet.engines[route.engine].name).counted());
            }
        };
        let e = &app.fleet.engines[engine];
        span.record("engine", e.name.as_str());
        let body = match call.engine_body(e.priority.then_some(i64::from(route.level))) {
            Ok(b) => b,
            Err(err) => {
                tracker.finish(Outcome::EngineError);
                return Err(err.counted());
            }
        };
        let (err, why) = match attempt(app, engine, endpoint, body, timeout, call.stream).await {
            Ok((parts, body)) => {
                app.breaker.success(engine);
                return Ok(Answered {
                    engine,
                    parts,
                    body,
                });
            }
            Err(failure) => failure,
        };
        // Nothing reached the client yet: charge the engine, try another.
        if app.breaker.failure(engine) == Verdict::Ejected {
            app.metrics
                .ejections
                .get_or_create(&label("engine", &e.name))
                .inc();
            tracing::warn!(engine = %e.name, "engine ejected after consecutive failures");
        }
        failed.push(engine);
        let rest: Vec<usize> = all_candidates
            .iter()
            .copied()
            .filter(|i| !failed.contains(i) && app.breaker.allows(*i) && app.health.is_healthy(*i))
            .collect();
        if rest.is_empty() || failed.len() >= app.engine_attempts {
            tracker.finish(Outcome::EngineError);
            return Err(err.counted());
        }
        app.metrics
            .retries
            .get_or_create(&label("reason", why))
            .inc();
        tracing::info!(engine = %e.name, reason = why, %err, "retrying the call on another engine");
        // The failed engine's slot goes back before waiting for another.
        tracker.release_slot();
        ask = Request {
            level: route.level,
            service: route.service,
            size,
            preferred: crate::routing::rendezvous_pick(app, &rest, session),
            // Any engine with room will do.
            bind_delay: 0.0,
            candidates: rest,
            stage,
        };
    }
}
