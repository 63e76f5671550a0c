//! Session records, the run's summary, and the output files.
//!
//! A call is *ok* when it got a 2xx answer whose stream ended with
//! `[DONE]` and carried no error; latency distributions and throughput count
//! ok calls only. Session completion time counts sessions that sent every
//! planned call and had no error.

use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::Path;

use crate::client::CallRecord;
use crate::metrics::CacheDelta;
use crate::stats::Dist;

/// One session's record (a line of `sessions.jsonl`). Times in simulated seconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct SessionRecord {
    pub session: String,
    pub calls: usize,
    pub errors: usize,
    /// Every planned call was sent (not cut by a limit or a stop).
    pub complete: bool,
    /// First call sent, seconds after the run's start.
    pub first_sent: f64,
    /// Last answer received, seconds after the run's start.
    pub last_done: f64,
    /// Session completion time: first call sent → last answer received.
    pub completion: f64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// prompt_tokens + output_tokens.
    pub total_tokens: u64,
}

impl SessionRecord {
    /// The record of a session that sent `calls` (at least one).
    pub fn of(session: &str, calls: &[CallRecord], complete: bool) -> Self {
        let first_sent = calls
            .iter()
            .map(|c| c.sent_at)
            .fold(f64::INFINITY, f64::min);
        let last_done = calls
            .iter()
            .map(|c| c.sent_at + c.e2e)
            .fold(f64::NEG_INFINITY, f64::max);
        let (first_sent, last_done) = if calls.is_empty() {
            (0.0, 0.0)
        } else {
            (first_sent, last_done)
        };
        let prompt_tokens = calls.iter().map(|c| c.prompt_tokens).sum();
        let output_tokens = calls.iter().map(|c| c.completion_tokens).sum();
        Self {
            session: session.to_owned(),
            calls: calls.len(),
            errors: calls.iter().filter(|c| c.error.is_some()).count(),
            complete,
            first_sent,
            last_done,
            completion: last_done - first_sent,
            prompt_tokens,
            output_tokens,
            total_tokens: prompt_tokens + output_tokens,
        }
    }
}

/// The run's summary (`summary.json`). Times in simulated seconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Summary {
    pub label: String,
    pub workload: String,
    /// Calls sent.
    pub calls: usize,
    /// Calls that were not ok.
    pub errors: usize,
    /// Sessions that sent at least one call.
    pub sessions: usize,
    /// Sessions counted in `session_completion`.
    pub sessions_complete: usize,
    pub ttft: Dist,
    pub tpot: Dist,
    pub e2e: Dist,
    pub session_completion: Dist,
    /// First call sent → last answer received.
    pub duration: f64,
    /// Ok calls per second of `duration`.
    pub calls_per_s: f64,
    /// Output tokens of ok calls per second of `duration`.
    pub output_tokens_per_s: f64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// Σ `cached_tokens` reported in usage.
    pub cached_tokens: u64,
    /// Σ Δhits ÷ Σ Δqueries of the engines' prefix caches over the run
    /// (with `--engine-metrics`; `None` without, or with no queries).
    pub cache_hit_rate: Option<f64>,
    pub cache_hits: Option<f64>,
    pub cache_queries: Option<f64>,
    /// Engines whose counters were read at both ends.
    pub cache_engines: usize,
    pub time_scale: f64,
    /// Send lag of the calls sent (see `CallRecord::lag`): how far behind
    /// its plan the replayer ran; near zero when the machine kept up.
    pub send_lag: Dist,
    /// The largest send lag, seconds.
    pub send_lag_max: f64,
    /// Up to five distinct error messages.
    pub error_samples: Vec<String>,
}

/// What the summary is about besides the records.
#[derive(Clone, Debug, Default)]
pub struct RunInfo {
    pub label: String,
    pub workload: String,
    pub time_scale: f64,
    /// With `--engine-metrics`.
    pub cache: Option<CacheDelta>,
}

pub fn summarize(info: &RunInfo, calls: &[CallRecord], sessions: &[SessionRecord]) -> Summary {
    let ok: Vec<&CallRecord> = calls.iter().filter(|c| c.error.is_none()).collect();
    let start = calls
        .iter()
        .map(|c| c.sent_at)
        .fold(f64::INFINITY, f64::min);
    let end = calls
        .iter()
        .map(|c| c.sent_at + c.e2e)
        .fold(f64::NEG_INFINITY, f64::max);
    let duration = if calls.is_empty() {
        0.0
    } else {
        (end - start).max(0.0)
    };
    let per_s = |n: f64| if duration > 0.0 { n / duration } else { 0.0 };
    let output_tokens: u64 = ok.iter().map(|c| c.completion_tokens).sum();
    let done: Vec<&SessionRecord> = sessions
        .iter()
        .filter(|s| s.complete && s.errors == 0 && s.calls > 0)
        .collect();
    let mut error_samples: Vec<String> = Vec::new();
    for e in calls.iter().filter_map(|c| c.error.as_ref()) {
        if error_samples.len() == 5 {
            break;
        }
        if !error_samples.contains(e) {
            error_samples.push(e.clone());
        }
    }
    Summary {
        label: info.label.clone(),
        workload: info.workload.clone(),
        calls: calls.len(),
        errors: calls.len() - ok.len(),
        sessions: sessions.iter().filter(|s| s.calls > 0).count(),
        sessions_complete: done.len(),
        ttft: Dist::of(ok.iter().filter_map(|c| c.ttft).collect()),
        tpot: Dist::of(ok.iter().filter_map(|c| c.tpot).collect()),
        e2e: Dist::of(ok.iter().map(|c| c.e2e).collect()),
        session_completion: Dist::of(done.iter().map(|s| s.completion).collect()),
        duration,
        calls_per_s: per_s(ok.len() as f64),
        output_tokens_per_s: per_s(output_tokens as f64),
        prompt_tokens: ok.iter().map(|c| c.prompt_tokens).sum(),
        output_tokens,
        cached_tokens: ok.iter().map(|c| c.cached_tokens).sum(),
        cache_hit_rate: info.cache.and_then(|c| c.hit_rate()),
        cache_hits: info.cache.map(|c| c.hits),
        cache_queries: info.cache.map(|c| c.queries),
        cache_engines: info.cache.map_or(0, |c| c.engines),
        time_scale: info.time_scale,
        send_lag: Dist::of(calls.iter().map(|c| c.lag).collect()),
        send_lag_max: calls.iter().map(|c| c.lag).fold(0.0, f64::max),
        error_samples,
    }
}

/// Writes `calls.jsonl`, `sessions.jsonl` and `summary.json` into `dir`.
pub fn write(
    dir: &Path,
    calls: &[CallRecord],
    sessions: &[SessionRecord],
    summary: &Summary,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    jsonl(&dir.join("calls.jsonl"), calls)?;
    jsonl(&dir.join("sessions.jsonl"), sessions)?;
    let path = dir.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(summary)? + "\n")
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok(())
}

fn jsonl<T: Serialize>(path: &Path, rows: &[T]) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut f = std::io::BufWriter::new(file);
    for r in rows {
        serde_json::to_writer(&mut f, r)?;
        f.write_all(b"\n")?;
    }
    f.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(session: &str, sent_at: f64, e2e: f64, error: bool) -> CallRecord {
        CallRecord {
            session: session.to_owned(),
            lag: sent_at / 10.0,
            sent_at,
            e2e,
            status: 200,
            ttft: Some(e2e / 4.0),
            tpot: Some(0.01),
            prompt_tokens: 100,
            completion_tokens: 10,
            cached_tokens: 50,
            error: error.then(|| "boom".to_owned()),
            ..CallRecord::default()
        }
    }

    #[test]
    fn sessions_and_summary() {
        let a = [call("a", 1.0, 2.0, false), call("a", 4.0, 1.0, false)];
        let b = [call("b", 2.0, 1.0, true)];
        let sa = SessionRecord::of("a", &a, true);
        assert_eq!(
            (sa.first_sent, sa.last_done, sa.completion),
            (1.0, 5.0, 4.0)
        );
        assert_eq!((sa.output_tokens, sa.total_tokens), (20, 220));
        let sb = SessionRecord::of("b", &b, true);
        let calls: Vec<CallRecord> = a.iter().chain(&b).cloned().collect();
        let info = RunInfo {
            label: "l".into(),
            workload: "chat".into(),
            time_scale: 1.0,
            cache: Some(CacheDelta {
                hits: 1.0,
                queries: 4.0,
                engines: 2,
            }),
        };
        let s = summarize(&info, &calls, &[sa, sb]);
        assert_eq!(
            (s.calls, s.errors, s.sessions, s.sessions_complete),
            (3, 1, 2, 1)
        );
        assert_eq!(s.ttft.count, 2);
        assert_eq!(s.duration, 4.0);
        assert_eq!(s.calls_per_s, 0.5);
        assert_eq!(s.output_tokens_per_s, 5.0);
        assert_eq!(s.session_completion.mean, 4.0);
        assert_eq!(s.cache_hit_rate, Some(0.25));
        assert_eq!(s.error_samples, vec!["boom".to_owned()]);
        // Lag over every call sent, errors included.
        assert_eq!((s.send_lag.count, s.send_lag_max), (3, 0.4));
        // Round trip.
        let back: Summary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        let empty = summarize(&RunInfo::default(), &[], &[]);
        assert_eq!(
            (empty.calls, empty.duration, empty.cache_hit_rate),
            (0, 0.0, None)
        );
    }
}
