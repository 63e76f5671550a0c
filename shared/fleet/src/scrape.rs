//! The engines' own load, scraped from their Prometheus `/metrics`.
//!
//! Names read, by engine kind:
//! - vLLM: `vllm:num_requests_running`, `vllm:num_requests_waiting`,
//!   `vllm:kv_cache_usage_perc` (older releases: `vllm:gpu_cache_usage_perc`);
//! - SGLang: `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:token_usage`.
//!
//! Samples of one name are summed over their label sets (a server with
//! several models or ranks); the text is read by [`crate::prom`]. A scrape that fails counts as a failed health
//! probe (see [`crate::health`]); the last good sample is kept.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use crate::{EngineClient, EngineKind, FleetConfig, FleetHealth, HealthConfig};

/// One engine's reported load.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct EngineSample {
    pub running: f64,
    pub waiting: f64,
    /// KV cache usage, 0..=1.
    pub kv_usage: f64,
}

/// Parses a Prometheus text exposition for the names of `kind`. None when the
/// text holds none of them.
pub fn parse(text: &str, kind: EngineKind) -> Option<EngineSample> {
    let (running, waiting, usage): (&[&str], &[&str], &[&str]) = match kind {
        EngineKind::Vllm | EngineKind::Openai => (
            &["vllm:num_requests_running"],
            &["vllm:num_requests_waiting"],
            &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        ),
        EngineKind::Sglang => (
            &["sglang:num_running_reqs"],
            &["sglang:num_queue_reqs"],
            &["sglang:token_usage"],
        ),
    };
    let mut s = EngineSample::default();
    let mut found = false;
    for sample in crate::prom::samples(text) {
        let (name, v) = (sample.name.as_str(), sample.value);
        if !v.is_finite() {
            continue;
        }
        if running.contains(&name) {
            s.running += v;
            found = true;
        } else if waiting.contains(&name) {
            s.waiting += v;
            found = true;
        } else if usage.contains(&name) {
            s.kv_usage = s.kv_usage.max(v);
            found = true;
        }
    }
    found.then_some(s)
}

/// The tokens an engine has processed since it started, prompt and
/// generated together (vLLM and SGLang alike export
/// `<prefix>:prompt_tokens_total` and `<prefix>:generation_tokens_total`):
/// a counter that stands still while calls wait on the engine says it is
/// stuck. None when the text holds neither.
pub fn tokens_processed(text: &str, kind: EngineKind) -> Option<f64> {
    let names: &[&str] = match kind {
        EngineKind::Vllm | EngineKind::Openai => {
            &["vllm:prompt_tokens_total", "vllm:generation_tokens_total"]
        }
        EngineKind::Sglang => &[
            "sglang:prompt_tokens_total",
            "sglang:generation_tokens_total",
        ],
    };
    let mut total = None;
    for sample in crate::prom::samples(text) {
        if sample.value.is_finite() && names.contains(&sample.name.as_str()) {
            *total.get_or_insert(0.0) += sample.value;
        }
    }
    total
}

/// The latest sample of every engine, lock-free (f64 bits in atomics).
#[derive(Clone, Debug)]
pub struct FleetLoad {
    samples: Arc<Vec<[AtomicU64; 3]>>,
}

impl FleetLoad {
    pub fn new(engines: usize) -> Self {
        Self {
            samples: Arc::new(
                (0..engines)
                    .map(|_| [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)])
                    .collect(),
            ),
        }
    }

    #[inline]
    pub fn get(&self, engine: usize) -> EngineSample {
        self.samples
            .get(engine)
            .map(|s| EngineSample {
                running: f64::from_bits(s[0].load(Ordering::Relaxed)),
                waiting: f64::from_bits(s[1].load(Ordering::Relaxed)),
                kv_usage: f64::from_bits(s[2].load(Ordering::Relaxed)),
            })
            .unwrap_or_default()
    }

    /// Running plus waiting, as last reported (0 when never scraped): the
    /// part of [`Self::get`] a route decision reads, without the KV usage.
    #[inline]
    pub fn queued(&self, engine: usize) -> f64 {
        self.samples.get(engine).map_or(0.0, |s| {
            f64::from_bits(s[0].load(Ordering::Relaxed))
                + f64::from_bits(s[1].load(Ordering::Relaxed))
        })
    }

    pub fn set(&self, engine: usize, s: EngineSample) {
        if let Some(a) = self.samples.get(engine) {
            a[0].store(s.running.to_bits(), Ordering::Relaxed);
            a[1].store(s.waiting.to_bits(), Ordering::Relaxed);
            a[2].store(s.kv_usage.to_bits(), Ordering::Relaxed);
        }
    }
}

/// Scrapes every engine's `/metrics` each interval until `shutdown`; feeds
/// both the load samples and the health flags.
pub fn spawn_scraper(
    fleet: Arc<FleetConfig>,
    load: FleetLoad,
    health: FleetHealth,
    client: EngineClient,
    cfg: HealthConfig,
    shutdown: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(cfg.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let mut handles = Vec::with_capacity(fleet.engines.len());
            for (i, e) in fleet.engines.iter().enumerate() {
                let (client, url, kind, timeout) =
                    (client.clone(), e.endpoint("/metrics"), e.kind, cfg.timeout);
                handles.push(tokio::spawn(async move {
                    (i, scrape(&client, &url, kind, timeout).await)
                }));
            }
            for h in handles {
                let Ok((i, result)) = h.await else { continue };
                match result {
                    Some(sample) => {
                        load.set(i, sample);
                        health.record(i, true, &cfg);
                    }
                    None => health.record(i, false, &cfg),
                }
            }
        }
    })
}

/// One scrape of an engine's `/metrics`; None when it fails.
pub async fn scrape(
    client: &EngineClient,
    url: &str,
    kind: EngineKind,
    timeout: Duration,
) -> Option<EngineSample> {
    let text = metrics_text(client, url, timeout).await?;
    // A server without the known names is alive but tells nothing of its load.
    Some(parse(&text, kind).unwrap_or_default())
}

/// The text of an engine's `/metrics` (at most 4 MiB); None when the
/// request fails, times out or is not answered 2xx.
pub async fn metrics_text(client: &EngineClient, url: &str, timeout: Duration) -> Option<String> {
    let req = http::Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let resp = tokio::time::timeout(timeout, client.request(req))
        .await
        .ok()?
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let body = tokio::time::timeout(timeout, Limited::new(resp.into_body(), 4 << 20).collect())
        .await
        .ok()?
        .ok()?;
    Some(String::from_utf8_lossy(&body.to_bytes()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_processed_sums_prompt_and_generation_counters() {
        let v = "vllm:prompt_tokens_total{model_name=\"m\"} 100\nvllm:generation_tokens_total{model_name=\"m\"} 20\nvllm:generation_tokens_total{model_name=\"n\"} 5\nvllm:num_requests_running 3\n";
        assert_eq!(tokens_processed(v, EngineKind::Vllm), Some(125.0));
        let s = "sglang:generation_tokens_total{a=\"1\"} 7\n";
        assert_eq!(tokens_processed(s, EngineKind::Sglang), Some(7.0));
        assert_eq!(tokens_processed(s, EngineKind::Vllm), None);
        assert_eq!(tokens_processed("", EngineKind::Vllm), None);
    }

    #[test]
    fn parses_vllm_and_sglang() {
        let v = "# HELP x\nvllm:num_requests_running{model_name=\"m\"} 3\nvllm:num_requests_waiting{model_name=\"m\"} 2.0\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.5\n";
        assert_eq!(
            parse(v, EngineKind::Vllm),
            Some(EngineSample {
                running: 3.0,
                waiting: 2.0,
                kv_usage: 0.5
            })
        );
        let s = "sglang:num_running_reqs{a=\"1\"} 4\nsglang:num_running_reqs{a=\"2\"} 1\nsglang:num_queue_reqs 7\nsglang:token_usage 0.25\n";
        assert_eq!(
            parse(s, EngineKind::Sglang),
            Some(EngineSample {
                running: 5.0,
                waiting: 7.0,
                kv_usage: 0.25
            })
        );
        assert_eq!(parse("other 1\n", EngineKind::Vllm), None);
    }

    #[test]
    fn samples_with_timestamps_read_their_values() {
        let v = "vllm:num_requests_running{model_name=\"m\"} 3 1712345678901\n\
                 vllm:num_requests_waiting 2 1712345678901\n";
        assert_eq!(
            parse(v, EngineKind::Vllm),
            Some(EngineSample {
                running: 3.0,
                waiting: 2.0,
                kv_usage: 0.0
            })
        );
    }
}
