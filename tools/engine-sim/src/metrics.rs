//! Prometheus metrics with vLLM's names (`vllm:…`), written by hand: the
//! names hold colons, which the client libraries do not all keep. Latencies
//! are in simulated seconds.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use crate::config::SimConfig;
use crate::engine::{Stats, Timing};

const TTFT: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0,
];
const TPOT: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
const LONG: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len()],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64) {
        let v = v.max(0.0);
        for (b, c) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if v <= *b {
                *c += 1;
            }
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {c}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Debug)]
struct State {
    /// The most a step has ended behind its simulated schedule, simulated seconds.
    lag_max: f64,
    running: usize,
    waiting: usize,
    kv_usage: f64,
    stats: Stats,
    ttft: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    queue: Histogram,
    by_priority: BTreeMap<i64, u64>,
}

/// The engine's metrics, shared by the engine task (writer) and `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    labels: String,
    max_num_seqs: usize,
    block_size: usize,
    num_blocks: usize,
    state: Mutex<State>,
}

/// A label value, escaped for the exposition format.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Labels every series with `model_name` (the first model served) and
    /// `engine` (the engine's name).
    pub fn new(cfg: &SimConfig) -> Self {
        Self {
            labels: format!(
                "model_name=\"{}\",engine=\"{}\"",
                escape(cfg.default_model()),
                escape(&cfg.name)
            ),
            max_num_seqs: cfg.max_num_seqs,
            block_size: cfg.block_size,
            num_blocks: cfg.kv_cache_tokens / cfg.block_size.max(1),
            state: Mutex::new(State {
                lag_max: 0.0,
                running: 0,
                waiting: 0,
                kv_usage: 0.0,
                stats: Stats::default(),
                ttft: Histogram::new(TTFT),
                tpot: Histogram::new(TPOT),
                e2e: Histogram::new(LONG),
                queue: Histogram::new(LONG),
                by_priority: BTreeMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_engine(&self, running: usize, waiting: usize, kv_usage: f64, stats: Stats) {
        let mut s = self.lock();
        s.running = running;
        s.waiting = waiting;
        s.kv_usage = kv_usage;
        s.stats = stats;
    }

    /// A step ended `lag` simulated seconds behind schedule (the machine
    /// did not keep up with the time scale).
    pub fn observe_lag(&self, lag: f64) {
        let mut s = self.lock();
        if lag.is_finite() && lag > s.lag_max {
            s.lag_max = lag;
        }
    }

    pub fn observe_finished(&self, t: &Timing, completion_tokens: usize) {
        let mut s = self.lock();
        s.ttft.observe(t.ttft);
        s.e2e.observe(t.e2e);
        s.queue.observe(t.queue);
        if completion_tokens > 1 {
            s.tpot
                .observe((t.e2e - t.ttft) / (completion_tokens - 1) as f64);
        }
    }

    pub fn count_priority(&self, priority: i64) {
        *self.lock().by_priority.entry(priority).or_insert(0) += 1;
    }

    pub fn render(&self) -> String {
        let s = self.lock();
        let l = &self.labels;
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, v: f64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{l}}} {v}"
            );
        };
        gauge(
            "vllm:num_requests_running",
            "Requests in the running batch.",
            s.running as f64,
        );
        gauge(
            "vllm:num_requests_waiting",
            "Requests waiting to be scheduled.",
            s.waiting as f64,
        );
        gauge(
            "vllm:kv_cache_usage_perc",
            "KV cache usage (1 = 100%).",
            s.kv_usage,
        );
        gauge(
            "tether_sim_lag_seconds_max",
            "The most a step has ended behind its simulated schedule, simulated seconds (0: the machine kept up).",
            s.lag_max,
        );
        gauge(
            "tether_sim_max_num_seqs",
            "The engine's max-num-seqs limit.",
            self.max_num_seqs as f64,
        );
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name}_total{{{l}}} {v}"
            );
        };
        counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache.",
            s.stats.prefix_queries,
        );
        counter(
            "vllm:prefix_cache_hits",
            "Prompt tokens found in the prefix cache.",
            s.stats.prefix_hits,
        );
        counter(
            "vllm:prompt_tokens",
            "Prompt tokens of admitted requests.",
            s.stats.prompt_tokens,
        );
        counter(
            "vllm:generation_tokens",
            "Tokens generated.",
            s.stats.generation_tokens,
        );
        counter(
            "vllm:num_preemptions",
            "Sequences preempted.",
            s.stats.preemptions,
        );
        let _ = writeln!(
            out,
            "# HELP vllm:request_success Requests finished.\n# TYPE vllm:request_success counter\n\
             vllm:request_success_total{{{l},finished_reason=\"length\"}} {}",
            s.stats.finished
        );
        s.ttft.render(
            &mut out,
            "vllm:time_to_first_token_seconds",
            "Time to first token (simulated s).",
            l,
        );
        s.tpot.render(
            &mut out,
            "vllm:time_per_output_token_seconds",
            "Time per output token (simulated s).",
            l,
        );
        s.e2e.render(
            &mut out,
            "vllm:e2e_request_latency_seconds",
            "End-to-end latency (simulated s).",
            l,
        );
        s.queue.render(
            &mut out,
            "vllm:request_queue_time_seconds",
            "Time waiting before first scheduled (simulated s).",
            l,
        );
        let _ = writeln!(
            out,
            "# HELP tether_sim_requests_by_priority Requests received, by their priority field.\n# TYPE tether_sim_requests_by_priority counter"
        );
        for (p, n) in &s.by_priority {
            let _ = writeln!(
                out,
                "tether_sim_requests_by_priority_total{{{l},priority=\"{p}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP vllm:cache_config_info Information of the KV cache configuration.\n\
             # TYPE vllm:cache_config_info gauge\n\
             vllm:cache_config_info{{{l},block_size=\"{}\",num_gpu_blocks=\"{}\",enable_prefix_caching=\"True\"}} 1",
            self.block_size, self.num_blocks
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_vllm_names() {
        let m = Metrics::new(&SimConfig {
            models: vec!["m".into()],
            max_num_seqs: 8,
            ..SimConfig::named("sim-1")
        });
        m.set_engine(
            2,
            1,
            0.5,
            Stats {
                prefix_hits: 3,
                ..Stats::default()
            },
        );
        m.observe_finished(
            &Timing {
                queue: 0.1,
                ttft: 0.2,
                e2e: 1.2,
            },
            11,
        );
        m.count_priority(4);
        let text = m.render();
        assert!(text.contains("vllm:num_requests_running{model_name=\"m\",engine=\"sim-1\"} 2"));
        assert!(text.contains("vllm:prefix_cache_hits_total{model_name=\"m\",engine=\"sim-1\"} 3"));
        assert!(text.contains(
            "vllm:time_per_output_token_seconds_count{model_name=\"m\",engine=\"sim-1\"} 1"
        ));
        assert!(text.contains("tether_sim_requests_by_priority_total{model_name=\"m\",engine=\"sim-1\",priority=\"4\"} 1"));
        assert!(text.contains("tether_sim_max_num_seqs{model_name=\"m\",engine=\"sim-1\"} 8"));
        assert!(text.contains("num_gpu_blocks=\"25000\""));
        // Every sample line is `name{labels} value`, the value a number.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().unwrap();
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "{line}"
            );
            assert!(series.ends_with('}'), "{line}");
        }
    }
}
