//! Benchmark: one scheduling decision, in process, with 1,000,000 live
//! sessions in the replica and 64 engines; and the replica's memory per
//! session (resident-set growth while filling it, read from /proc).
//!
//! Run with `just bench` (release build). Figures are printed, not asserted:
//! the machines are shared and noisy.

use std::sync::Arc;
use std::time::Instant;
use tether_fleet::{EngineConfig, EngineKind, FleetConfig, FleetHealth, FleetLoad};
use tether_protocol::{RouteRequest, SessionRecord, SnapshotPage, stable_hash};
use tether_scheduler::decider::{Decider, PolicyKnobs};

const SESSIONS: u64 = 1_000_000;
const ENGINES: usize = 64;
/// Decisions timed; `TETHER_BENCH_DECISIONS` overrides (e.g. for a profile).
const DECISIONS: usize = 200_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let engines = (0..ENGINES)
        .map(|i| EngineConfig {
            name: format!("engine-{i}"),
            url: format!("http://127.0.0.1:{}", 10_000 + i),
            models: vec!["m".into()],
            kind: EngineKind::Vllm,
            priority: false,
            max_concurrency: 256,
            cache_tokens: 450_000,
            kv_events: None,
            kv_replay: None,
        })
        .collect();
    let fleet = Arc::new(FleetConfig { engines });
    let shards = 16u16;
    let knobs = PolicyKnobs {
        prefix_blocks: 1_000_000,
        ..PolicyKnobs::default()
    };
    let mut d = Decider::new(
        fleet,
        FleetHealth::new(ENGINES),
        FleetLoad::new(ENGINES),
        shards,
        knobs,
    );

    // Fill the replica through the same path a resync uses, one page at a time.
    let before = rss_bytes();
    let page_size = 10_000u64;
    let mut next = 0u64;
    while next < SESSIONS {
        let sessions = (next..(next + page_size).min(SESSIONS))
            .map(|i| SessionRecord {
                hash: stable_hash(&i.to_le_bytes()),
                version: 1,
                cst: (i % 100) as f64,
                attained: (i % 300) as f64,
                wait: (i % 7) as f64,
                in_flight: 0,
                requests: 3,
                affinity: Some(format!("engine-{}", i % ENGINES as u64)),
                last_active_ms: 1_700_000_000_000,
            })
            .collect();
        d.apply_page(&SnapshotPage {
            shard: 0,
            epoch: 1,
            seq: 1,
            sessions,
            next: None,
        });
        next += page_size;
    }
    let after = rss_bytes();
    let per_session = (after.saturating_sub(before)) as f64 / SESSIONS as f64;

    // Decisions for known sessions (affinity) and unknown ones (least loaded),
    // with calls finishing so that loads stay realistic.
    let decisions = std::env::var("TETHER_BENCH_DECISIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DECISIONS);
    let mut lat = Vec::with_capacity(decisions);
    let mut req = RouteRequest {
        call_id: 0,
        session_hash: 0,
        model: "m".into(),
        prompt_tokens: 100,
        block_hashes: vec![],
        candidates: vec![],
        program: false,
    };
    for i in 0..decisions as u64 {
        req.call_id = i;
        req.session_hash = if i % 4 == 0 {
            stable_hash(&(i + SESSIONS).to_le_bytes())
        } else {
            stable_hash(&(i * 7 % SESSIONS).to_le_bytes())
        };
        let t = Instant::now();
        let reply = d.decide(&req, 1_700_000_000_000);
        lat.push(t.elapsed().as_nanos() as u64);
        std::hint::black_box(reply);
        if i >= 512 {
            d.loads.finish(i - 512);
        }
    }
    lat.sort_unstable();
    println!("decide: {SESSIONS} sessions, {ENGINES} engines, {decisions} decisions");
    println!(
        "  p50 {:.3} µs   p90 {:.3} µs   p99 {:.3} µs   max {:.1} µs",
        percentile(&lat, 0.5) as f64 / 1000.0,
        percentile(&lat, 0.9) as f64 / 1000.0,
        percentile(&lat, 0.99) as f64 / 1000.0,
        *lat.last().unwrap_or(&0) as f64 / 1000.0
    );
    println!(
        "  replica memory: {per_session:.1} bytes/session (RSS growth {:.1} MiB; record {} B)",
        (after.saturating_sub(before)) as f64 / (1 << 20) as f64,
        std::mem::size_of::<tether_scheduler::replica::Compact>()
    );
}
