//! Benchmark: the route round trip over NATS (ingress → scheduler → ingress)
//! on loopback, side by side with a bare NATS echo request-reply in the same
//! run — the floor any request-reply over this server and client pays.
//!
//! Three regimes for each: one request in flight (sequential), an open
//! loop at 5,000 requests/s, and a closed loop with 64 in flight (the most
//! requests per second one scheduler replica answers here). The scheduler runs in-process with 64 engines.
//! Figures are printed, not asserted.

use futures::StreamExt;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_bus::{Bus, BusConfig};
use tether_fleet::{EngineConfig, EngineKind, FleetConfig};
use tether_protocol::{RouteReply, RouteRequest, Subjects, stable_hash};
use tether_telemetry::Shutdown;
use tether_testkit::NatsServer;

const ENGINES: usize = 64;
const SEQUENTIAL: usize = 3000;
const RATE: u64 = 5000;
const SECONDS: u64 = 4;
const IN_FLIGHT: usize = 64;

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[(((sorted.len() - 1) as f64) * p).round() as usize]
}

fn req(i: u64) -> RouteRequest {
    RouteRequest {
        call_id: i,
        session_hash: stable_hash(&(i % 10_000).to_le_bytes()),
        model: "m".into(),
        prompt_tokens: 512,
        block_hashes: vec![],
        candidates: vec![],
        program: false,
    }
}

/// One request of the given kind; returns its latency in µs.
async fn once(bus: &Bus, echo: bool, i: u64) -> anyhow::Result<f64> {
    let t = Instant::now();
    if echo {
        let payload = tether_protocol::encode(&req(i))?;
        bus.client.request("bench.echo", payload.into()).await?;
    } else {
        let reply: RouteReply = bus
            .request(bus.subjects.route(), &req(i), Duration::from_secs(1))
            .await?;
        anyhow::ensure!(
            matches!(reply, RouteReply::Decision(_)),
            "no decision: {reply:?}"
        );
    }
    Ok(t.elapsed().as_secs_f64() * 1e6)
}

async fn sequential(bus: &Bus, echo: bool) -> anyhow::Result<Vec<f64>> {
    let mut lat = Vec::with_capacity(SEQUENTIAL);
    for i in 0..SEQUENTIAL as u64 {
        lat.push(once(bus, echo, i).await?);
    }
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

async fn open_loop(bus: &Bus, echo: bool) -> anyhow::Result<Vec<f64>> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let per_tick = RATE / 1000;
    let mut i = 0u64;
    let end = Instant::now() + Duration::from_secs(SECONDS);
    while Instant::now() < end {
        tick.tick().await;
        for _ in 0..per_tick {
            let (bus, tx) = (bus.clone(), tx.clone());
            i += 1;
            let n = i;
            tokio::spawn(async move {
                let _ = tx.send(once(&bus, echo, n).await);
            });
        }
    }
    drop(tx);
    let mut lat = Vec::new();
    while let Some(r) = rx.recv().await {
        lat.push(r?);
    }
    lat.sort_by(f64::total_cmp);
    Ok(lat)
}

/// Closed loop, [`IN_FLIGHT`] requests always outstanding, for [`SECONDS`]:
/// what one replica answers per second when it is the bottleneck.
async fn saturated(bus: &Bus, echo: bool) -> anyhow::Result<(f64, Vec<f64>)> {
    let start = Instant::now();
    let end = start + Duration::from_secs(SECONDS);
    let mut tasks = Vec::new();
    for w in 0..IN_FLIGHT {
        let bus = bus.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = (w as u64) << 32;
            while Instant::now() < end {
                i += 1;
                lat.push(once(&bus, echo, i).await?);
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let rate = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Ok((rate, lat))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let shutdown = Shutdown::new();

    // Engines must look healthy: one tiny server answering /health and
    // /metrics stands for all 64.
    let health = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let health_addr = health.local_addr()?;
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let app = axum::Router::new()
            .route("/health", axum::routing::get(|| async { "ok" }))
            .route("/metrics", axum::routing::get(|| async { "" }));
        let _ = tether_telemetry::serve_http(health, app, stop).await;
    });
    let engines = (0..ENGINES)
        .map(|i| EngineConfig {
            name: format!("engine-{i}"),
            url: format!("http://{health_addr}"),
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
    let url = nats.url();
    let cfg = <tether_scheduler::Config as clap::Parser>::try_parse_from([
        "x",
        "--nats-url",
        &url,
        "--admin-listen",
        "127.0.0.1:0",
    ])?;
    let sched = tether_scheduler::start_with_fleet(cfg, fleet, shutdown.child_token()).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sched.admin.is_ready() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The echo responder, on its own connection as the scheduler has.
    let echo_bus = Bus::connect(
        &BusConfig {
            url: url.clone(),
            name: "echo".into(),
        },
        Subjects::default(),
    )
    .await?;
    let mut echo_sub = echo_bus.client.subscribe("bench.echo").await?;
    let echo_client = echo_bus.client.clone();
    tokio::spawn(async move {
        while let Some(msg) = echo_sub.next().await {
            if let Some(reply) = msg.reply {
                let _ = echo_client.publish(reply, msg.payload).await;
            }
        }
    });

    let bus = Bus::connect(
        &BusConfig {
            url,
            name: "bench".into(),
        },
        Subjects::default(),
    )
    .await?;
    while !bus.is_connected() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Warm up both paths.
    for i in 0..500 {
        once(&bus, true, i).await?;
        once(&bus, false, i).await?;
    }

    println!("route round trip over NATS vs bare echo (same server, same client, same run)");
    for (regime, rate) in [("1 in flight", false), ("5000/s open loop", true)] {
        let (echo, route) = if rate {
            (open_loop(&bus, true).await?, open_loop(&bus, false).await?)
        } else {
            (
                sequential(&bus, true).await?,
                sequential(&bus, false).await?,
            )
        };
        let (e50, e99, r50, r99) = (
            pct(&echo, 0.5),
            pct(&echo, 0.99),
            pct(&route, 0.5),
            pct(&route, 0.99),
        );
        println!(
            "  {regime:>18}: echo p50 {e50:7.1} µs p99 {e99:7.1} µs | route p50 {r50:7.1} µs p99 {r99:7.1} µs | ratio p50 {:.2}x p99 {:.2}x  (n={}/{})",
            r50 / e50,
            r99 / e99,
            echo.len(),
            route.len()
        );
    }
    let (echo_rate, echo) = saturated(&bus, true).await?;
    let (route_rate, route) = saturated(&bus, false).await?;
    println!(
        "  {:>18}: echo {echo_rate:8.0}/s p50 {:7.1} µs | route {route_rate:8.0}/s p50 {:7.1} µs | ratio {:.2}x the echo's rate",
        format!("{IN_FLIGHT} in flight"),
        pct(&echo, 0.5),
        pct(&route, 0.5),
        route_rate / echo_rate
    );
    shutdown.cancel();
    sched.join().await;
    Ok(())
}
