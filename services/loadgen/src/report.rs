//! Records, percentiles and the run's summary; the engines' prefix-cache
//! counters.

use serde::{Deserialize, Serialize};

use crate::client::{CallRecord, HttpClient};

/// One session's record (a line of `sessions.jsonl`).
#[derive(Clone, Debug, Serialize)]
pub struct SessionRecord {
    pub session: String,
    pub calls: usize,
    pub errors: usize,
    /// First call sent → last answer received, seconds (simulated).
    pub completion: f64,
    pub output_tokens: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Dist {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
}

impl Dist {
    pub fn of(mut v: Vec<f64>) -> Self {
        v.retain(|x| x.is_finite());
        if v.is_empty() {
            return Self::default();
        }
        v.sort_by(f64::total_cmp);
        let p = |q: f64| v[(((v.len() - 1) as f64) * q).round() as usize];
        Self {
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: p(0.5),
            p90: p(0.9),
            p99: p(0.99),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Summary {
    pub label: String,
    pub calls: usize,
    pub errors: usize,
    pub sessions: usize,
    pub ttft: Dist,
    pub tpot: Dist,
    pub e2e: Dist,
    pub session_completion: Dist,
    /// Simulated seconds from the first call sent to the last answer.
    pub duration: f64,
    pub calls_per_s: f64,
    pub output_tokens_per_s: f64,
    /// Σ prefix-cache hits / Σ queries (tokens) over the engines, this run only.
    pub cache_hit_rate: Option<f64>,
}

pub fn summarize(
    label: &str,
    calls: &[CallRecord],
    sessions: &[SessionRecord],
    cache_hit_rate: Option<f64>,
) -> Summary {
    let ok: Vec<&CallRecord> = calls.iter().filter(|c| c.error.is_none()).collect();
    let start = calls
        .iter()
        .map(|c| c.sent_at)
        .fold(f64::INFINITY, f64::min);
    let end = calls.iter().map(|c| c.sent_at + c.e2e).fold(0.0, f64::max);
    let duration = if start.is_finite() {
        (end - start).max(1e-9)
    } else {
        0.0
    };
    let tokens: u64 = ok.iter().map(|c| c.completion_tokens).sum();
    Summary {
        label: label.to_owned(),
        calls: calls.len(),
        errors: calls.len() - ok.len(),
        sessions: sessions.len(),
        ttft: Dist::of(ok.iter().filter_map(|c| c.ttft).collect()),
        tpot: Dist::of(ok.iter().filter_map(|c| c.tpot).collect()),
        e2e: Dist::of(ok.iter().map(|c| c.e2e).collect()),
        session_completion: Dist::of(
            sessions
                .iter()
                .filter(|s| s.errors == 0)
                .map(|s| s.completion)
                .collect(),
        ),
        duration,
        calls_per_s: if duration > 0.0 {
            ok.len() as f64 / duration
        } else {
            0.0
        },
        output_tokens_per_s: if duration > 0.0 {
            tokens as f64 / duration
        } else {
            0.0
        },
        cache_hit_rate,
    }
}

/// Sums a counter over its label sets in Prometheus text (with or without `_total`).
pub fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let base = series.split('{').next()?;
            (base == name || base.strip_suffix("_total") == Some(name))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// (hits, queries) summed over engines' `/metrics`.
pub async fn cache_counters(client: &HttpClient, engines: &[String]) -> (f64, f64) {
    let mut hits = 0.0;
    let mut queries = 0.0;
    for e in engines {
        let url = format!("{}/metrics", e.trim_end_matches('/'));
        let Ok(req) = http::Request::get(url).body(http_body_util::Full::new(bytes::Bytes::new()))
        else {
            continue;
        };
        let Ok(resp) = client.request(req).await else {
            continue;
        };
        let Ok(body) = http_body_util::BodyExt::collect(resp.into_body()).await else {
            continue;
        };
        let text = String::from_utf8_lossy(&body.to_bytes()).into_owned();
        hits += counter(&text, "vllm:prefix_cache_hits");
        queries += counter(&text, "vllm:prefix_cache_queries");
    }
    (hits, queries)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let d = Dist::of((1..=100).map(f64::from).collect());
        assert_eq!((d.p50, d.p90, d.p99), (51.0, 90.0, 99.0));
        assert!((d.mean - 50.5).abs() < 1e-12);
        assert_eq!(Dist::of(vec![]), Dist::default());
    }

    #[test]
    fn counters_sum_label_sets() {
        let text = "# TYPE x counter\nvllm:prefix_cache_hits_total{a=\"1\"} 3\nvllm:prefix_cache_hits_total{a=\"2\"} 4\nother 9\n";
        assert_eq!(counter(text, "vllm:prefix_cache_hits"), 7.0);
    }
}
