//! Benchmark: how many request events one session-state replica applies
//! per second, and how fast the bus takes them in.
//!
//! A real nats-server with JetStream; session-state in-process with its
//! default flags (16 shards, durable consumers). The stream is filled first
//! (200,000 events: a `Dispatched` and a `Finished` for each of 100,000
//! calls over 100,000 sessions), then session-state starts and the time
//! until every shard's consumer has nothing left is measured: the replica's
//! apply rate (fetch, decode, apply with the ATLAS rule, ack, publish
//! deltas), not the publisher's. The process's resident memory before and
//! after bounds what the replica holds per session (consumer buffers
//! included). Figures are printed, not asserted.

use clap::Parser;
use std::time::{Duration, Instant};
use tether_bus::{Bus, BusArgs, jetstream};
use tether_protocol::{EventKind, Finished, Outcome, RequestEvent, now_ms, shard_of, stable_hash};
use tether_telemetry::Shutdown;
use tether_testkit::NatsServer;

const SESSIONS: u64 = 100_000;
const CALLS: u64 = 100_000;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    bus: BusArgs,
}

fn events() -> Vec<RequestEvent> {
    let base = now_ms();
    let mut out = Vec::with_capacity(2 * CALLS as usize);
    for call in 0..CALLS {
        let s = call % SESSIONS;
        let key = format!("bench-{s}");
        let hash = stable_hash(key.as_bytes());
        let engine = format!("e{}", call % 4);
        out.push(RequestEvent {
            call_id: call,
            session_hash: hash,
            session_key: key.clone(),
            at_ms: base + 2 * call,
            engine: engine.clone(),
            kind: EventKind::Dispatched {
                inherited_cst: 0.0,
                level: 0,
            },
        });
        out.push(RequestEvent {
            call_id: call,
            session_hash: hash,
            session_key: key,
            at_ms: base + 2 * call + 1,
            engine,
            kind: EventKind::Finished(Finished {
                inherited_cst: 0.0,
                executed: 0.5,
                waited: 0.01,
                wall: 0.5,
                prompt_tokens: 1000,
                cached_tokens: 500,
                completion_tokens: 100,
                outcome: Outcome::Ok,
            }),
        });
    }
    out
}

async fn session_state(url: &str, stop: Shutdown) -> anyhow::Result<tether_session_state::Running> {
    let config = tether_session_state::Config::try_parse_from([
        "x",
        "--nats-url",
        url,
        "--admin-listen",
        "127.0.0.1:0",
    ])?;
    let running = tether_session_state::start(config, stop).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !running.admin.is_ready() {
        anyhow::ensure!(Instant::now() < deadline, "session-state never got ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(running)
}

/// This process's resident memory (Linux), bytes.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Seconds until every shard's consumer has delivered and had acknowledged
/// everything in the stream.
async fn drain(bus: &Bus, shards: u16, start: Instant) -> anyhow::Result<f64> {
    let js = bus.jetstream();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !jetstream::shards_drained(&js, &bus.subjects, shards).await {
        anyhow::ensure!(Instant::now() < deadline, "shard consumers never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = nats.url();
    let args = Args::try_parse_from(["x", "--nats-url", &url])?;
    let shards = args.bus.shards;
    let bus = args.bus.connect("bench-events").await?;

    // A first start creates the stream and the shard consumers.
    let stop = Shutdown::new();
    let first = session_state(&url, stop.clone()).await?;
    stop.cancel();
    first.join().await;

    let events = events();
    let js = bus.jetstream();
    let t = Instant::now();
    // JetStream publishes, acknowledged in batches of 1,000 in flight. (Core
    // publishes at one connection's full speed were not all stored here: the
    // stream held fewer events than were sent.)
    let mut acks = Vec::with_capacity(1000);
    for e in &events {
        let subject = bus.subjects.events(shard_of(e.session_hash, shards));
        let mut headers = tether_bus::async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", jetstream::event_msg_id(e).as_str());
        let payload = tether_protocol::encode(e)?;
        acks.push(
            js.publish_with_headers(subject, headers, payload.into())
                .await?,
        );
        if acks.len() == 1000 {
            for ack in acks.drain(..) {
                ack.await?;
            }
        }
    }
    for ack in acks.drain(..) {
        ack.await?;
    }
    let stored = t.elapsed().as_secs_f64();
    let name = jetstream::events_stream_name(&bus.subjects);
    let state = js.get_stream(&name).await?.info().await?.state.clone();
    anyhow::ensure!(
        state.messages == events.len() as u64,
        "the stream holds {} of {} events",
        state.messages,
        events.len()
    );
    let per_event = state.bytes as f64 / state.messages.max(1) as f64;

    let rss_before = rss_bytes();
    let stop = Shutdown::new();
    let start = Instant::now();
    let running = session_state(&url, stop.clone()).await?;
    let applied = drain(&bus, shards, start).await?;
    let rss_after = rss_bytes();
    // What the replica says it applied: every event, every session.
    let text = tether_testkit::http::get(
        &tether_testkit::http::client(),
        &format!("http://{}/metrics", running.admin_addr),
    )
    .await?
    .text();
    let sum = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let (applied_events, sessions) = (
        sum("tether_session_events_total"),
        sum("tether_session_sessions"),
    );
    anyhow::ensure!(
        applied_events >= events.len() as f64 && sessions >= SESSIONS as f64,
        "session-state applied {applied_events} events, holds {sessions} sessions"
    );
    stop.cancel();
    running.join().await;

    let n = events.len() as f64;
    println!("request events through JetStream and one session-state replica ({shards} shards)");
    println!(
        "  stored by the bus : {:>9.0} events/s ({} events in {stored:.2} s, one publisher)",
        n / stored,
        events.len()
    );
    println!(
        "  applied           : {:>9.0} events/s ({} events in {applied:.2} s, {SESSIONS} sessions)",
        n / applied,
        events.len()
    );
    println!("  stream            : {per_event:>9.0} bytes/event stored");
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        println!(
            "  memory            : {:>9.0} bytes/session (resident growth over {SESSIONS} sessions, buffers included)",
            b.saturating_sub(a) as f64 / SESSIONS as f64
        );
    }
    Ok(())
}
