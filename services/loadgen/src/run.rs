//! Driving a plan: one task per session, sleeping in scaled time, sending
//! each step's calls together and waiting for all their answers.

use serde_json::{Value, json};
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::client::{CallRecord, HttpClient, Target, call, http_client};
use crate::config::{Cli, PacingArg, Workload};
use crate::plan::{Pacing, Plan, Session};
use crate::report::{SessionRecord, Summary, cache_counters, summarize};
use crate::synth::{SynthConfig, agent, chat};

/// Builds the plan a command line describes.
pub fn plan_of(cli: &Cli) -> anyhow::Result<Plan> {
    Ok(match &cli.workload {
        Workload::Mooncake {
            trace,
            pacing,
            speedup,
            max_think,
            max_requests,
        } => {
            let text = std::fs::read_to_string(trace)
                .map_err(|e| anyhow::anyhow!("{}: {e}", trace.display()))?;
            let mut reqs = crate::mooncake::parse(&text)?;
            if *max_requests > 0 {
                reqs.truncate(*max_requests);
            }
            let pacing = match pacing {
                PacingArg::Closed => Pacing::Closed,
                PacingArg::Open => Pacing::Open,
            };
            crate::mooncake::plan(&reqs, pacing, *speedup, *max_think)
        }
        Workload::Chat {
            synth,
            turns,
            think,
        } => chat(&synth_config(synth, *think), *turns),
        Workload::Agent {
            synth,
            steps,
            fanout,
        } => agent(&synth_config(synth, 0.0), *steps, *fanout),
    })
}

fn synth_config(a: &crate::config::SynthArgs, think: f64) -> SynthConfig {
    SynthConfig {
        sessions: a.sessions,
        rate: a.rate,
        seed: a.seed,
        prompt_words: (a.prompt_min, a.prompt_max),
        answer_tokens: (a.answer_min, a.answer_max),
        think,
    }
}

struct Shared {
    client: HttpClient,
    base_url: String,
    model: String,
    session_header: String,
    scale: f64,
    start: Instant,
    pacing: Pacing,
    limit: Semaphore,
}

/// Runs the workload and returns its summary (and writes the records when `--out` is set).
pub async fn run(cli: Cli) -> anyhow::Result<Summary> {
    let plan = plan_of(&cli)?;
    let c = &cli.common;
    let scale = if c.time_scale > 0.0 {
        c.time_scale
    } else {
        1.0
    };
    let client = http_client();
    let before = cache_counters(&client, &c.engine_metrics).await;
    let shared = Arc::new(Shared {
        client,
        base_url: c.base_url.clone(),
        model: c.model.clone(),
        session_header: c.session_header.clone(),
        scale,
        start: Instant::now(),
        pacing: plan.pacing,
        limit: Semaphore::new(c.concurrency_limit.max(1)),
    });
    tracing::info!(
        sessions = plan.sessions.len(),
        calls = plan.calls(),
        "starting"
    );
    let mut tasks = tokio::task::JoinSet::new();
    for s in plan.sessions {
        tasks.spawn(run_session(shared.clone(), s));
    }
    let mut calls = Vec::new();
    let mut sessions = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (srec, crecs) = done?;
        sessions.push(srec);
        calls.extend(crecs);
    }
    let after = cache_counters(&shared.client, &c.engine_metrics).await;
    let queries = after.1 - before.1;
    let hit_rate =
        (!c.engine_metrics.is_empty() && queries > 0.0).then(|| (after.0 - before.0) / queries);
    calls.sort_by(|a, b| a.sent_at.total_cmp(&b.sent_at));
    let summary = summarize(&c.label, &calls, &sessions, hit_rate);
    if let Some(dir) = &c.out {
        std::fs::create_dir_all(dir)?;
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("calls.jsonl"))?);
        for r in &calls {
            writeln!(f, "{}", serde_json::to_string(r)?)?;
        }
        let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("sessions.jsonl"))?);
        for r in &sessions {
            writeln!(f, "{}", serde_json::to_string(r)?)?;
        }
        std::fs::write(
            dir.join("summary.json"),
            serde_json::to_string_pretty(&summary)?,
        )?;
    }
    Ok(summary)
}

async fn sleep_until_sim(shared: &Shared, t: f64) {
    let at = shared.start + Duration::from_secs_f64((t / shared.scale).max(0.0));
    tokio::time::sleep_until(at).await;
}

fn sim_now(shared: &Shared) -> f64 {
    shared.start.elapsed().as_secs_f64() * shared.scale
}

async fn run_session(shared: Arc<Shared>, s: Session) -> (SessionRecord, Vec<CallRecord>) {
    sleep_until_sim(&shared, s.start).await;
    let target = Target {
        client: &shared.client,
        base_url: &shared.base_url,
        model: &shared.model,
        session_header: &shared.session_header,
        time_scale: shared.scale,
    };
    let mut history: Vec<Value> = Vec::new();
    let mut records = Vec::new();
    let first = sim_now(&shared);
    let mut last_end = first;
    for (i, step) in s.steps.iter().enumerate() {
        match shared.pacing {
            Pacing::Closed => sleep_until_sim(&shared, sim_now(&shared) + step.delay).await,
            Pacing::Open => sleep_until_sim(&shared, s.start + step.delay).await,
        }
        let sent_at = sim_now(&shared);
        let futures = step.calls.iter().enumerate().map(|(b, c)| {
            let mut messages = if s.carry_history {
                history.clone()
            } else {
                Vec::new()
            };
            messages.push(json!({"role": "user", "content": c.prompt}));
            let target = &target;
            let shared = &shared;
            let id = &s.id;
            async move {
                let _permit = shared.limit.acquire().await;
                let mut r = call(target, id, &messages, c.max_tokens).await;
                r.step = i;
                r.branch = b;
                r.sent_at = sent_at;
                r
            }
        });
        let results = join_all(futures).await;
        last_end = sim_now(&shared);
        if s.carry_history {
            for (c, r) in step.calls.iter().zip(&results) {
                history.push(json!({"role": "user", "content": c.prompt}));
                history.push(json!({"role": "assistant", "content": r.answer}));
            }
        }
        records.extend(results);
    }
    let rec = SessionRecord {
        session: s.id.clone(),
        calls: records.len(),
        errors: records.iter().filter(|r| r.error.is_some()).count(),
        completion: last_end - first,
        output_tokens: records.iter().map(|r| r.completion_tokens).sum(),
    };
    (rec, records)
}

/// Awaits futures concurrently on this task (no spawning: they borrow).
async fn join_all<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in pinned.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
