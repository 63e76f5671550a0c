//! Where a call runs. The scheduler decides, over NATS request-reply with a
//! short timeout; when it cannot (bus down, no scheduler, timeout, an engine
//! name this ingress does not know) the ingress decides alone with a
//! the engine that last served the session here (a bounded cache, see
//! [`crate::affinity`]) or else a rendezvous hash of the session over the
//! engines it believes healthy, and counts the fallback. Engines the circuit
//! breaker ejected are no candidates.

use std::time::{Duration, Instant};
use tether_bus::BusError;
use tether_policy::{EngineLoad, rendezvous};
use tether_protocol::{CallId, RouteReason, RouteReply, RouteRequest, SessionKey, stable_hash};

use crate::errors::ApiError;
use crate::request::CallBody;
use crate::service::App;

#[derive(Clone, Debug, PartialEq)]
pub struct Route {
    pub engine: usize,
    /// Engine seconds the call waits for `engine` before any candidate with
    /// room will do (late binding); infinite: it never moves.
    pub bind_delay: f64,
    /// The healthy engines serving the call's model.
    pub candidates: Vec<usize>,
    pub level: u8,
    pub inherited_cst: f64,
    /// The service behind `level`, seconds.
    pub service: f64,
    pub reason: RouteReason,
}

pub async fn route(
    app: &App,
    call_id: CallId,
    key: &SessionKey,
    body: &CallBody,
    program: bool,
) -> Result<Route, ApiError> {
    let candidates: Vec<usize> = app
        .fleet
        .engines
        .iter()
        .enumerate()
        .filter(|(i, e)| {
            e.serves(&body.model) && app.health.is_healthy(*i) && app.breaker.allows(*i)
        })
        .map(|(i, _)| i)
        .collect();
    if candidates.is_empty() {
        let known = app.fleet.engines.iter().any(|e| e.serves(&body.model));
        let msg = if known {
            format!("no healthy engine serves model {:?}", body.model)
        } else {
            format!("no engine serves model {:?}", body.model)
        };
        return Err(if known {
            // Either unhealthy or ejected by the circuit breaker.
            ApiError::no_engine(msg)
        } else {
            ApiError::not_found("model_not_found", msg)
        });
    }
    let req = RouteRequest {
        call_id,
        session_hash: key.hash(),
        model: body.model.clone(),
        prompt_tokens: u32::try_from(body.raw_len() / 4).unwrap_or(u32::MAX),
        block_hashes: match app.sim_block_size {
            Some(bs) => tether_protocol::sim_token_blocks(&body.sim_prompt_text(), bs),
            None => tether_protocol::prompt_blocks(body.prompt_text().as_bytes()),
        },
        candidates: candidates
            .iter()
            .map(|i| app.fleet.engines[*i].name.clone())
            .collect(),
        program,
    };
    let started = Instant::now();
    let answer = app
        .bus
        .request::<_, RouteReply>(
            app.bus.subjects.route(),
            &req,
            Duration::from_millis(app.route_timeout_ms),
        )
        .await;
    app.metrics
        .route_seconds
        .observe(started.elapsed().as_secs_f64());
    let reason = match answer {
        Ok(RouteReply::Decision(d)) => match app.fleet.index_of(&d.engine) {
            Some(engine) => {
                app.metrics
                    .decisions
                    .get_or_create(&[("reason", d.reason.as_str())])
                    .inc();
                return Ok(Route {
                    engine,
                    bind_delay: if d.bind_delay.is_nan() {
                        0.0
                    } else {
                        d.bind_delay.max(0.0)
                    },
                    candidates,
                    level: d.level,
                    inherited_cst: d.inherited_cst,
                    service: d.service,
                    reason: d.reason,
                });
            }
            None => "unknown_engine",
        },
        Ok(RouteReply::NoEngine { reason }) => return Err(ApiError::no_engine(reason)),
        Err(BusError::Disconnected) => "disconnected",
        Err(BusError::NoResponders(_)) => "no_responders",
        Err(BusError::TimedOut(_)) => "timeout",
        Err(BusError::Codec(_)) => "bad_reply",
        Err(_) => "error",
    };
    app.metrics
        .fallbacks
        .get_or_create(&[("reason", reason)])
        .inc();
    tracing::debug!(reason, "scheduler unavailable; routing locally");
    Ok(fallback(app, &candidates, key))
}

/// The candidate a rendezvous hash of the session picks (stable while the
/// candidates stay the same).
pub fn rendezvous_pick(app: &App, candidates: &[usize], session: u64) -> usize {
    let loads: Vec<EngineLoad> = candidates
        .iter()
        .map(|i| EngineLoad {
            healthy: true,
            load: 0.0,
            id_hash: stable_hash(app.fleet.engines[*i].name.as_bytes()),
        })
        .collect();
    rendezvous(&loads, session)
        .and_then(|j| candidates.get(j).copied())
        .unwrap_or(candidates[0])
}

fn fallback(app: &App, candidates: &[usize], key: &SessionKey) -> Route {
    // The engine that last served the session here, while it is a
    // candidate; else a rendezvous hash of the session.
    let pick = match app.recent.get(key.hash()) {
        Some(engine) if candidates.contains(&engine) => {
            app.metrics.fallback_affinity.inc();
            engine
        }
        _ => rendezvous_pick(app, candidates, key.hash()),
    };
    Route {
        engine: pick,
        // Without the scheduler nothing is known of caches: any engine with
        // room will do.
        bind_delay: 0.0,
        candidates: candidates.to_vec(),
        level: 0,
        inherited_cst: 0.0,
        service: 0.0,
        reason: RouteReason::Fallback,
    }
}
