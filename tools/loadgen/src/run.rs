//! Driving a plan: one task per session, sleeping in scaled time, sending
//! each step's calls together and waiting for all their answers (closed
//! loop), or sending every step at its own time (open loop).

use serde_json::{Value, json};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::client::{CallRecord, HttpClient, Target, call, completions_url, http_client};
use crate::config::{LoadgenConfig, Workload};
use crate::gate::Gate;
use crate::metrics::{CacheDelta, read_all};
use crate::mooncake::TraceOptions;
use crate::plan::{Call, Pacing, Plan, Session};
use crate::report::{RunInfo, SessionRecord, Summary, summarize, write};
use crate::synth::{agent, chat};

/// Builds the plan a configuration describes (reads the trace).
pub fn plan_of(config: &LoadgenConfig) -> anyhow::Result<Plan> {
    Ok(match &config.workload {
        Workload::Mooncake(m) => {
            let text = std::fs::read_to_string(&m.trace)
                .map_err(|e| anyhow::anyhow!("{}: {e}", m.trace.display()))?;
            let mut reqs = crate::mooncake::parse(&text)?;
            if config.common.max_requests > 0 {
                reqs.truncate(config.common.max_requests);
            }
            crate::mooncake::plan(
                &reqs,
                TraceOptions {
                    pacing: m.pacing(),
                    speedup: m.speedup,
                    max_think: m.max_think_secs,
                    rule: m.session_rule,
                    min_shared: m.min_shared_blocks,
                },
            )
        }
        Workload::Chat(c) => chat(c),
        Workload::Agent(a) => agent(a),
    })
}

struct Shared {
    client: HttpClient,
    url: String,
    model: String,
    session_header: String,
    extra_session_headers: Vec<String>,
    scale: f64,
    timeout: Option<Duration>,
    start: Instant,
    pacing: Pacing,
    limit: Semaphore,
    gate: Gate,
    sent: AtomicUsize,
    answered: AtomicUsize,
    failed: AtomicUsize,
}

impl Shared {
    /// Simulated seconds since the start.
    fn now(&self) -> f64 {
        self.start.elapsed().as_secs_f64() * self.scale
    }

    /// The wall instant of simulated time `t`.
    fn at(&self, t: f64) -> Instant {
        later(self.start, wall(t, self.scale))
    }

    /// How late it is against the wall instant `planned`, simulated seconds.
    fn lag(&self, planned: Instant) -> f64 {
        Instant::now()
            .saturating_duration_since(planned)
            .as_secs_f64()
            * self.scale
    }

    fn target(&self) -> Target<'_> {
        Target {
            client: &self.client,
            url: &self.url,
            model: &self.model,
            session_header: &self.session_header,
            extra_session_headers: &self.extra_session_headers,
            time_scale: self.scale,
            timeout: self.timeout,
        }
    }
}

/// A century: "never" for waits.
const FOREVER: Duration = Duration::from_secs(100 * 365 * 86_400);

/// Simulated seconds → a wall duration (negative: zero; at most a century).
fn wall(t: f64, scale: f64) -> Duration {
    match Duration::try_from_secs_f64(t / scale) {
        Ok(d) => d.min(FOREVER),
        Err(_) if t > 0.0 => FOREVER,
        Err(_) => Duration::ZERO,
    }
}

fn later(from: Instant, d: Duration) -> Instant {
    from.checked_add(d)
        .or_else(|| from.checked_add(FOREVER))
        .unwrap_or(from)
}

/// Runs the workload to the end (or a limit) and returns its summary;
/// writes the records when `out` is set.
pub async fn run(config: LoadgenConfig) -> anyhow::Result<Summary> {
    run_until(config, std::future::pending()).await
}

/// [`run`], stopping early (no new calls; calls in flight are awaited)
/// when `stop` completes.
pub async fn run_until(
    config: LoadgenConfig,
    stop: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<Summary> {
    let c = &config.common;
    anyhow::ensure!(
        c.time_scale.is_finite() && c.time_scale > 0.0,
        "--time-scale must be positive"
    );
    let url = completions_url(&c.base_url);
    let uri: http::Uri = url
        .parse()
        .map_err(|e| anyhow::anyhow!("--base-url {}: {e}", c.base_url))?;
    anyhow::ensure!(
        uri.scheme_str() == Some("http"),
        "--base-url {}: only http:// is supported",
        c.base_url
    );
    let plan = plan_of(&config)?;
    let client = http_client();
    let before = read_all(&client, &c.engine_metrics).await;
    if let Some(i) = before.iter().position(Option::is_none) {
        tracing::warn!(engine = %c.engine_metrics[i], "could not read /metrics; left out of the hit rate");
    }
    let timeout = c
        .request_timeout_secs
        .filter(|t| *t > 0.0)
        .map(|t| wall(t, c.time_scale));
    let shared = Arc::new(Shared {
        client,
        url,
        model: c.model.clone(),
        session_header: c.session_header.clone(),
        extra_session_headers: c.extra_session_headers.clone(),
        scale: c.time_scale,
        timeout,
        start: Instant::now(),
        pacing: plan.pacing,
        limit: Semaphore::new(c.concurrency_limit.clamp(1, Semaphore::MAX_PERMITS)),
        gate: Gate::new(c.max_requests),
        sent: AtomicUsize::new(0),
        answered: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    });
    tracing::info!(
        workload = config.workload.name(),
        sessions = plan.sessions.len(),
        calls = plan.calls(),
        url = %shared.url,
        "starting"
    );
    let mut watchers = tokio::task::JoinSet::new();
    watchers.spawn({
        let shared = shared.clone();
        async move {
            stop.await;
            shared.gate.stop();
        }
    });
    if let Some(d) = c.duration_secs {
        let shared = shared.clone();
        watchers.spawn(async move {
            tokio::time::sleep_until(shared.at(d.max(0.0))).await;
            tracing::info!("duration reached: no new calls");
            shared.gate.stop();
        });
    }
    watchers.spawn(progress(shared.clone()));

    let mut tasks = tokio::task::JoinSet::new();
    for s in plan.sessions {
        tasks.spawn(run_session(shared.clone(), s));
    }
    let mut calls = Vec::new();
    let mut sessions = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done {
            Ok((srec, crecs)) => {
                sessions.extend(srec);
                calls.extend(crecs);
            }
            Err(e) => tracing::error!(error = %e, "a session task failed; its records are lost"),
        }
    }
    watchers.shutdown().await;

    let cache = if c.engine_metrics.is_empty() {
        None
    } else {
        let after = read_all(&shared.client, &c.engine_metrics).await;
        Some(CacheDelta::between(&before, &after))
    };
    calls.sort_by(|a, b| a.sent_at.total_cmp(&b.sent_at));
    sessions.sort_by(|a, b| a.first_sent.total_cmp(&b.first_sent));
    let info = RunInfo {
        label: c.label.clone(),
        workload: config.workload.name().to_owned(),
        time_scale: c.time_scale,
        cache,
    };
    let summary = summarize(&info, &calls, &sessions);
    if let Some(dir) = &c.out {
        write(dir, &calls, &sessions, &summary)?;
    }
    Ok(summary)
}

/// Logs counts every ten wall seconds.
async fn progress(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    loop {
        tick.tick().await;
        tracing::info!(
            sim_secs = shared.now().round(),
            sent = shared.sent.load(Ordering::Relaxed),
            answered = shared.answered.load(Ordering::Relaxed),
            errors = shared.failed.load(Ordering::Relaxed),
            "progress"
        );
    }
}

/// Sends one call (after a concurrency permit) and labels its record.
async fn send(
    shared: &Shared,
    session: &str,
    mut messages: Vec<Value>,
    call_plan: &Call,
    (step, branch): (usize, usize),
    lag: f64,
) -> CallRecord {
    let waited_from = Instant::now();
    let _permit = shared.limit.acquire().await.ok();
    let queued = waited_from.elapsed().as_secs_f64() * shared.scale;
    messages.push(json!({"role": "user", "content": call_plan.prompt.render()}));
    let sent_at = shared.now();
    shared.sent.fetch_add(1, Ordering::Relaxed);
    let mut r = call(&shared.target(), session, &messages, call_plan.max_tokens).await;
    drop(messages);
    shared.answered.fetch_add(1, Ordering::Relaxed);
    if let Some(e) = &r.error
        && shared.failed.fetch_add(1, Ordering::Relaxed) == 0
    {
        tracing::warn!(session, error = %e, "first failed call");
    }
    r.step = step;
    r.branch = branch;
    r.trace_index = call_plan.trace_index;
    r.sent_at = sent_at;
    r.queued = queued;
    r.lag = lag;
    r
}

/// The session's opening system message, if it has one.
fn system_messages(s: &Session) -> Vec<Value> {
    s.system
        .iter()
        .map(|t| json!({"role": "system", "content": &**t}))
        .collect()
}

async fn run_session(shared: Arc<Shared>, s: Session) -> (Option<SessionRecord>, Vec<CallRecord>) {
    if !shared.gate.sleep_until(shared.at(s.start)).await {
        return (None, Vec::new());
    }
    let start_lag = shared.lag(shared.at(s.start));
    let planned: usize = s.steps.iter().map(|st| st.calls.len()).sum();
    let records = match shared.pacing {
        Pacing::Closed => closed_loop(&shared, &s, start_lag).await,
        Pacing::Open => open_loop(&shared, &s).await,
    };
    if records.is_empty() {
        return (None, records);
    }
    let rec = SessionRecord::of(&s.id, &records, records.len() == planned);
    (Some(rec), records)
}

/// Step N+1 after step N's answers plus its delay; history carried.
async fn closed_loop(shared: &Shared, s: &Session, start_lag: f64) -> Vec<CallRecord> {
    let opening = system_messages(s);
    let mut history: Vec<Value> = opening.clone();
    let mut records = Vec::new();
    for (i, step) in s.steps.iter().enumerate() {
        let mut lag = if i == 0 { start_lag } else { 0.0 };
        if i > 0 && step.delay > 0.0 {
            let at = later(Instant::now(), wall(step.delay, shared.scale));
            if !shared.gate.sleep_until(at).await {
                break;
            }
            lag = shared.lag(at);
        }
        let n = shared.gate.take(step.calls.len());
        let sent = &step.calls[..n];
        let base = if s.carry_history {
            history.clone()
        } else {
            opening.clone()
        };
        let results = futures::future::join_all(
            sent.iter()
                .enumerate()
                .map(|(b, c)| send(shared, &s.id, base.clone(), c, (i, b), lag)),
        )
        .await;
        if s.carry_history {
            for (c, r) in sent.iter().zip(&results) {
                history.push(json!({"role": "user", "content": c.prompt.render()}));
                history.push(json!({"role": "assistant", "content": r.answer}));
            }
        }
        records.extend(results);
        if n < step.calls.len() {
            break;
        }
    }
    records
}

/// Every step at the session's start plus its delay, answered or not.
async fn open_loop(shared: &Shared, s: &Session) -> Vec<CallRecord> {
    let opening = system_messages(s);
    let opening = &opening;
    let steps = s.steps.iter().enumerate().map(|(i, step)| async move {
        let at = shared.at(s.start + step.delay);
        if !shared.gate.sleep_until(at).await {
            return Vec::new();
        }
        let lag = shared.lag(at);
        let n = shared.gate.take(step.calls.len());
        futures::future::join_all(
            step.calls[..n]
                .iter()
                .enumerate()
                .map(|(b, c)| send(shared, &s.id, opening.clone(), c, (i, b), lag)),
        )
        .await
    });
    futures::future::join_all(steps)
        .await
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_durations() {
        assert_eq!(wall(10.0, 20.0), Duration::from_millis(500));
        assert_eq!(wall(-1.0, 1.0), Duration::ZERO);
        assert_eq!(wall(f64::INFINITY, 1.0), FOREVER);
        assert_eq!(wall(1e300, 1.0), FOREVER);
        assert_eq!(wall(f64::NAN, 1.0), Duration::ZERO);
    }
}
