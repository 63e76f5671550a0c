//! Durability of session state over a real nats-server with JetStream:
//! session-state killed under load (a child process sent SIGKILL: no final
//! flush, acknowledgement or snapshot) and restarted ends with every session
//! exactly as a reference that applied each event once;
//! a scheduler resynchronises every shard of a restarted session-state,
//! idle ones included; a flood of new sessions at the cap evicts no session
//! active within the idle TTL; with shard leases, a hung replica's shards
//! move to another, which ends identical to the reference while the hung one,
//! resumed, applies nothing more; a nats-server restart loses and repeats
//! nothing; in a three-node cluster, losing the node that leads the events
//! stream loses and repeats nothing either.

use clap::Parser;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tether_bus::{Bus, BusArgs, jetstream};
use tether_fleet::FleetConfig;
use tether_protocol::{
    EventKind, Finished, Outcome, RequestEvent, SessionQuery, SessionRecord, SessionView, now_ms,
    shard_of, stable_hash,
};
use tether_session_state::tether_session::{SessionTable, TableLimits};
use tether_telemetry::Shutdown;
use tether_testkit::http;
use tether_testkit::{NatsCluster, NatsServer};

const SHARDS: u16 = 4;

#[derive(Parser)]
struct TestBus {
    #[command(flatten)]
    bus: BusArgs,
}

async fn test_bus(url: &str) -> anyhow::Result<Bus> {
    let args = TestBus::try_parse_from(["x", "--nats-url", url, "--shards", &SHARDS.to_string()])?;
    Ok(args.bus.connect("durability-test").await?)
}

async fn start_session_state(
    url: &str,
    stop: Shutdown,
) -> anyhow::Result<tether_session_state::Running> {
    start_session_state_with(url, stop, &[]).await
}

async fn start_session_state_with(
    url: &str,
    stop: Shutdown,
    extra: &[&str],
) -> anyhow::Result<tether_session_state::Running> {
    let base = [
        "x",
        "--nats-url",
        url,
        "--shards",
        &SHARDS.to_string(),
        "--admin-listen",
        "127.0.0.1:0",
        "--delta-interval-ms",
        "2",
        "--snapshot-interval-ms",
        "100",
        "--announce-interval-ms",
        "100",
    ];
    let config =
        tether_session_state::Config::try_parse_from(base.iter().chain(extra.iter()).copied())?;
    tether_session_state::start(config, stop).await
}

/// The environment variable that makes [`session_state_child`] run the service.
const CHILD_ARGS: &str = "TETHER_DURABILITY_CHILD_ARGS";

/// Not a test: the body of a session-state child process. The test binary
/// runs itself with only this function selected and the service's flags in
/// [`CHILD_ARGS`]; without them it returns at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "runs only as the child process of a durability test"]
async fn session_state_child() -> anyhow::Result<()> {
    let Ok(args) = std::env::var(CHILD_ARGS) else {
        return Ok(());
    };
    let args: Vec<&str> = args.split_whitespace().collect();
    let running = start_session_state_with(args[0], Shutdown::new(), &args[1..]).await?;
    running.join().await; // never: the parent kills this process
    Ok(())
}

/// session-state in a child process (this test binary), killed with
/// SIGKILL when dropped or by [`Child::kill9`].
struct Child {
    process: std::process::Child,
    admin: std::net::SocketAddr,
}

impl Child {
    fn start(url: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let admin: std::net::SocketAddr =
            format!("127.0.0.1:{}", tether_testkit::free_port()?).parse()?;
        let process = std::process::Command::new(std::env::current_exe()?)
            .args([
                "session_state_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(
                CHILD_ARGS,
                format!("{url} --admin-listen {admin} {}", extra.join(" ")),
            )
            .stdout(std::process::Stdio::null())
            // The child's errors, if any, show in the test's output.
            .stderr(std::process::Stdio::inherit())
            .spawn()?;
        Ok(Self { process, admin })
    }

    async fn ready(&self) -> anyhow::Result<()> {
        let client = http::client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http::get(&client, &format!("http://{}/ready", self.admin)).await
                && r.status == 200
            {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the child session-state never got ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Pauses (`SIGSTOP`) or resumes (`SIGCONT`) the process: a hung owner.
    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = std::process::Command::new("kill")
            .args([signal, &self.process.id().to_string()])
            .status()?;
        anyhow::ensure!(status.success(), "kill {signal} failed");
        Ok(())
    }

    /// `kill -9`.
    fn kill9(&mut self) -> anyhow::Result<()> {
        self.process.kill()?;
        self.process.wait()?;
        Ok(())
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> anyhow::Result<f64> {
    let text = http::get(&http::client(), &format!("http://{addr}/metrics"))
        .await?
        .text();
    Ok(tether_universe::metric_sum(&text, name, ""))
}

/// A deterministic workload: `calls` calls over `sessions` sessions, each a
/// `Dispatched` then a `Finished`, interleaved, with varied durations and
/// engines; a few calls are left in flight.
fn workload(sessions: u64, calls: u64) -> Vec<RequestEvent> {
    let base = now_ms();
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut events = Vec::new();
    let mut open: Vec<(u64, u64, f64)> = Vec::new();
    let mut t = base;
    for call in 0..calls {
        let s = next() % sessions;
        let key = format!("durable-{s}");
        let h = (next() % 1000) as f64 / 250.0;
        t += 1;
        events.push(RequestEvent {
            call_id: 0x5000_0000_0000 + call,
            session_hash: stable_hash(key.as_bytes()),
            session_key: key,
            at_ms: t,
            engine: format!("e{}", next() % 4),
            kind: EventKind::Dispatched {
                inherited_cst: h,
                level: 0,
            },
        });
        open.push((call, s, h));
        // Finish a random open call now and then (most calls finish).
        while open.len() > 8 || (!open.is_empty() && next() % 3 == 0) {
            let i = (next() as usize) % open.len();
            let (call, s, h) = open.swap_remove(i);
            let key = format!("durable-{s}");
            t += 1;
            let executed = (next() % 10_000) as f64 / 997.0;
            events.push(RequestEvent {
                call_id: 0x5000_0000_0000 + call,
                session_hash: stable_hash(key.as_bytes()),
                session_key: key,
                at_ms: t,
                engine: format!("e{}", next() % 4),
                kind: EventKind::Finished(Finished {
                    inherited_cst: h,
                    executed,
                    waited: (next() % 500) as f64 / 1000.0,
                    wall: executed,
                    prompt_tokens: 10,
                    cached_tokens: 0,
                    completion_tokens: 5,
                    outcome: Outcome::Ok,
                }),
            });
        }
    }
    events
}

async fn publish(bus: &Bus, event: &RequestEvent) -> anyhow::Result<()> {
    let subject = bus.subjects.events(shard_of(event.session_hash, SHARDS));
    let id = jetstream::event_msg_id(event);
    bus.publish_with_id(subject, event, &id).await?;
    Ok(())
}

/// Waits until every shard's consumer has delivered and had acknowledged
/// (applied) everything in the stream.
async fn drained(bus: &Bus) -> anyhow::Result<()> {
    let js = bus.jetstream();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        anyhow::ensure!(Instant::now() < deadline, "shard consumers never drained");
        tokio::time::sleep(Duration::from_millis(50)).await;
        if jetstream::shards_drained(&js, &bus.subjects, SHARDS).await {
            return Ok(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_under_load_loses_and_repeats_nothing() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = nats.url();
    let bus = test_bus(&url).await?;
    let events = workload(150, 1_500);
    assert!(events.len() > 2_900, "{} events", events.len());

    // The reference: every event applied once, in order, by the same rules.
    let mut reference = SessionTable::new(TableLimits::default());
    for e in &events {
        reference.apply(e, 0);
    }

    let mut first = Child::start(&url, &[])?;
    first.ready().await?;

    // A third of the load, then wait for every shard to have a snapshot.
    let third = events.len() / 3;
    for e in &events[..third] {
        publish(&bus, e).await?;
    }
    bus.client.flush().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(first.admin, "tether_session_snapshots_written").await? < f64::from(SHARDS) {
        anyhow::ensure!(Instant::now() < deadline, "no snapshots written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The rest under way while the service is killed and restarted. Every
    // tenth event is also sent a second time (the same id: a retried
    // publish), which JetStream must drop.
    let sent = Arc::new(AtomicUsize::new(third));
    let publisher = {
        let bus = bus.clone();
        let rest: Vec<RequestEvent> = events[third..].to_vec();
        let sent = sent.clone();
        tokio::spawn(async move {
            for (i, e) in rest.iter().enumerate() {
                publish(&bus, e).await?;
                if i % 10 == 0 {
                    publish(&bus, e).await?;
                }
                sent.fetch_add(1, Ordering::Relaxed);
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            bus.client.flush().await?;
            anyhow::Ok(())
        })
    };
    let kill_at = third + (events.len() - third) / 3;
    while sent.load(Ordering::Relaxed) < kill_at {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first.kill9()?;
    let killed_at = sent.load(Ordering::Relaxed);

    let stop = Shutdown::new();
    let second = start_session_state(&url, stop.clone()).await?;
    publisher.await??;
    assert!(
        killed_at < events.len(),
        "the kill came after the load ended"
    );
    drained(&bus).await?;
    assert!(
        metric(second.admin_addr, "tether_session_snapshots_loaded").await? >= 1.0,
        "the restarted service did not start from a snapshot"
    );

    // Every session, exactly as in the reference.
    same_as_reference(&bus, &reference, 150).await?;
    // Nothing in the restarted service beyond the reference's sessions.
    assert_eq!(
        metric(second.admin_addr, "tether_session_sessions").await?,
        150.0
    );

    stop.cancel();
    second.join().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduler_resyncs_every_shard_of_a_restarted_session_state() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = nats.url();
    let bus = test_bus(&url).await?;
    let first_stop = Shutdown::new();
    let first = start_session_state(&url, first_stop.clone()).await?;

    let fleet = Arc::new(FleetConfig::from_toml(
        "[[engines]]\nname = \"e0\"\nurl = \"http://127.0.0.1:9\"\nmodels = [\"m\"]\n",
        "test fleet",
    )?);
    let sched_stop = Shutdown::new();
    let scheduler = tether_scheduler::start_with_fleet(
        tether_scheduler::Config::try_parse_from([
            "x",
            "--nats-url",
            &url,
            "--shards",
            &SHARDS.to_string(),
            "--admin-listen",
            "127.0.0.1:0",
        ])?,
        fleet,
        sched_stop.clone(),
    )
    .await?;

    // Sessions on every shard, then quiet.
    let events = workload(40, 200);
    for e in &events {
        publish(&bus, e).await?;
    }
    bus.client.flush().await?;
    drained(&bus).await?;
    let mut shards_hit: HashMap<u16, usize> = HashMap::new();
    for e in &events {
        *shards_hit
            .entry(shard_of(e.session_hash, SHARDS))
            .or_default() += 1;
    }
    assert_eq!(shards_hit.len(), usize::from(SHARDS));
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(scheduler.admin_addr, "tether_scheduler_sessions").await? != 40.0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the scheduler never held every session"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let resyncs_before = metric(scheduler.admin_addr, "tether_scheduler_resyncs").await?;

    // Kill and restart session-state; no event follows, so every shard is idle.
    first.abort();
    drop(first_stop);
    let stop = Shutdown::new();
    let second = start_session_state(&url, stop.clone()).await?;

    // The scheduler resyncs all four shards (each announced its new epoch)
    // and still holds every session (restored by session-state).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let resyncs = metric(scheduler.admin_addr, "tether_scheduler_resyncs").await?;
        let sessions = metric(scheduler.admin_addr, "tether_scheduler_sessions").await?;
        if resyncs >= resyncs_before + f64::from(SHARDS) && sessions == 40.0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "idle shards not resynchronised: {resyncs} resyncs (before {resyncs_before}), {sessions} sessions"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    sched_stop.cancel();
    scheduler.join().await;
    stop.cancel();
    second.join().await;
    Ok(())
}

async fn session(bus: &Bus, key: &str) -> anyhow::Result<SessionView> {
    let shard = shard_of(stable_hash(key.as_bytes()), SHARDS);
    Ok(bus
        .request(
            bus.subjects.session(shard),
            &SessionQuery {
                session_key: key.to_owned(),
            },
            Duration::from_secs(2),
        )
        .await?)
}

fn event(key: &str, call_id: u64, kind: EventKind) -> RequestEvent {
    RequestEvent {
        call_id,
        session_hash: stable_hash(key.as_bytes()),
        session_key: key.to_owned(),
        at_ms: now_ms(),
        engine: "e0".into(),
        kind,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_new_sessions_evicts_no_live_one() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = nats.url();
    let bus = test_bus(&url).await?;
    let stop = Shutdown::new();
    // 64 sessions over 4 shards: 16 per shard.
    let running = start_session_state_with(&url, stop.clone(), &["--max-sessions", "64"]).await?;

    // A session with a call in flight, and one whose call just ended.
    let finished = EventKind::Finished(Finished {
        inherited_cst: 0.0,
        executed: 1.0,
        waited: 0.0,
        wall: 1.0,
        prompt_tokens: 1,
        cached_tokens: 0,
        completion_tokens: 1,
        outcome: Outcome::Ok,
    });
    let dispatched = EventKind::Dispatched {
        inherited_cst: 0.0,
        level: 0,
    };
    publish(&bus, &event("live-busy", 1, dispatched)).await?;
    publish(&bus, &event("live-recent", 2, finished.clone())).await?;
    for i in 0..5_000u64 {
        publish(
            &bus,
            &event(&format!("flood-{i}"), 1_000 + i, finished.clone()),
        )
        .await?;
    }
    bus.client.flush().await?;
    drained(&bus).await?;

    let busy = session(&bus, "live-busy").await?;
    assert_eq!(
        busy.in_flight_calls,
        vec![1],
        "the busy session was evicted"
    );
    let recent = session(&bus, "live-recent").await?;
    assert_eq!(
        recent.record.map(|r| r.requests),
        Some(0),
        "the recently active session was evicted"
    );
    assert!(metric(running.admin_addr, "tether_session_sessions").await? <= 64.0);
    assert!(metric(running.admin_addr, "tether_session_refused").await? >= 5_000.0 - 64.0);
    assert_eq!(
        metric(running.admin_addr, "tether_session_evicted").await?,
        0.0
    );

    stop.cancel();
    running.join().await;
    Ok(())
}

/// Asks session-state for every session of `reference` and compares (all
/// fields but the delta version, which depends on batching).
async fn same_as_reference(
    bus: &Bus,
    reference: &SessionTable,
    sessions: usize,
) -> anyhow::Result<()> {
    compare_with_reference(bus, reference, sessions, |got, want| {
        SessionRecord {
            version: 0,
            ..got.clone()
        } == SessionRecord {
            version: 0,
            ..want.clone()
        }
    })
    .await
}

/// Every session of `reference` as session-state answers it: the same
/// calls, in-flight calls and last activity, and the same service and wait
/// up to rounding; affinity is not compared (see the cluster test).
async fn same_totals_as_reference(
    bus: &Bus,
    reference: &SessionTable,
    sessions: usize,
) -> anyhow::Result<()> {
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0);
    compare_with_reference(bus, reference, sessions, |got, want| {
        got.requests == want.requests
            && got.in_flight == want.in_flight
            && got.last_active_ms == want.last_active_ms
            && close(got.cst, want.cst)
            && close(got.attained, want.attained)
            && close(got.wait, want.wait)
    })
    .await
}

/// Asks session-state for every session of `reference`: each must exist,
/// have the reference's in-flight calls, and a record `same` accepts.
async fn compare_with_reference(
    bus: &Bus,
    reference: &SessionTable,
    sessions: usize,
    same: impl Fn(&SessionRecord, &SessionRecord) -> bool,
) -> anyhow::Result<()> {
    let mut mismatches = Vec::new();
    let mut compared = 0;
    for (hash, want) in reference.iter() {
        let view: SessionView = bus
            .request(
                bus.subjects.session(shard_of(*hash, SHARDS)),
                &SessionQuery {
                    session_key: want.key.clone(),
                },
                Duration::from_secs(2),
            )
            .await?;
        let want_rec = want.record(*hash);
        let want_calls: Vec<u64> = want.in_flight.iter().map(|(id, _)| *id).collect();
        let ok = view.record.as_ref().is_some_and(|got| same(got, &want_rec));
        if !ok || view.in_flight_calls != want_calls {
            mismatches.push(format!(
                "{}: got {:?} {:?}, want {want_rec:?} {want_calls:?}",
                want.key, view.record, view.in_flight_calls
            ));
        }
        compared += 1;
    }
    assert_eq!(compared, sessions);
    assert!(
        mismatches.is_empty(),
        "{} sessions differ, e.g. {:?}",
        mismatches.len(),
        &mismatches[..mismatches.len().min(3)]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_owners_shards_move_and_it_applies_nothing_more() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let url = nats.url();
    let bus = test_bus(&url).await?;
    let events = workload(120, 1_200);
    let mut reference = SessionTable::new(TableLimits::default());
    for e in &events {
        reference.apply(e, 0);
    }
    let lease = ["--lease-ttl-ms", "1000"];

    // A takes every shard; B, started later, waits for leases.
    let a = Child::start(&url, &lease)?;
    a.ready().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(a.admin, "tether_session_leases").await? < f64::from(SHARDS) {
        anyhow::ensure!(Instant::now() < deadline, "A never leased every shard");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stop = Shutdown::new();
    let b = start_session_state_with(&url, stop.clone(), &lease).await?;

    let third = events.len() / 3;
    for e in &events[..third] {
        publish(&bus, e).await?;
    }
    bus.client.flush().await?;
    drained(&bus).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(a.admin, "tether_session_snapshots_written").await? < f64::from(SHARDS) {
        anyhow::ensure!(Instant::now() < deadline, "no snapshots written");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(metric(b.admin_addr, "tether_session_leases").await?, 0.0);

    // A hangs; the load goes on; B takes the shards over.
    a.signal("-STOP")?;
    let hung = Instant::now();
    for e in &events[third..2 * third] {
        publish(&bus, e).await?;
    }
    bus.client.flush().await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while metric(b.admin_addr, "tether_session_leases").await? < f64::from(SHARDS) {
        anyhow::ensure!(Instant::now() < deadline, "B never took the shards over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("takeover after {:?} (lease TTL 1 s)", hung.elapsed());

    // A resumes: its leases have lapsed; it stops its shards.
    a.signal("-CONT")?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(a.admin, "tether_session_leases").await? > 0.0 {
        anyhow::ensure!(Instant::now() < deadline, "A never noticed its lost leases");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let applied_by_a = metric(a.admin, "tether_session_events").await?;
    for e in &events[2 * third..] {
        publish(&bus, e).await?;
    }
    bus.client.flush().await?;
    drained(&bus).await?;
    same_as_reference(&bus, &reference, 120).await?;
    assert_eq!(
        metric(a.admin, "tether_session_events").await?,
        applied_by_a,
        "the fenced replica applied events"
    );
    assert_eq!(
        metric(b.admin_addr, "tether_session_leases").await?,
        f64::from(SHARDS)
    );

    stop.cancel();
    b.join().await;
    drop(a);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_restart_loses_and_repeats_nothing() -> anyhow::Result<()> {
    let mut nats = NatsServer::start()?;
    let url = nats.url();
    let bus = test_bus(&url).await?;
    let events = workload(100, 1_000);
    let mut reference = SessionTable::new(TableLimits::default());
    for e in &events {
        reference.apply(e, 0);
    }
    let stop = Shutdown::new();
    let running = start_session_state(&url, stop.clone()).await?;

    let half = events.len() / 2;
    for e in &events[..half] {
        publish(&bus, e).await?;
    }
    bus.client.flush().await?;
    drained(&bus).await?;

    // nats-server killed and started again on the same port and store.
    nats.restart()?;
    until_connected(&bus, "the test client never reconnected").await?;
    for e in &events[half..] {
        publish(&bus, e).await?;
    }
    bus.client.flush().await?;
    drained(&bus).await?;
    same_as_reference(&bus, &reference, 100).await?;
    assert!(metric(running.admin_addr, "tether_session_consumer_restarts").await? >= 1.0);
    assert_eq!(
        metric(running.admin_addr, "tether_session_replay_gaps").await?,
        0.0
    );

    stop.cancel();
    running.join().await;
    Ok(())
}

/// A three-node cluster, the events stream and the snapshots in three
/// replicas (`--js-replicas 3`), every client given every node. Events go
/// out through the ingress's acknowledged publisher; halfway the node that
/// leads the events stream is killed for good. Every event is stored once,
/// and every session ends with the reference's calls, in-flight calls and
/// service. (An event sent again during the election may be stored after
/// later events of its shard; what depends on the order of one session's
/// events — its affinity, the rounding of its sums — may then differ.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_cluster_node_loses_and_repeats_nothing() -> anyhow::Result<()> {
    use tether_ingress::events::{PublishConfig, spawn_publisher};

    let mut cluster = NatsCluster::start(3)?;
    let urls = cluster.urls();
    let bus = test_bus(&urls).await?;
    until_connected(&bus, "never connected to the cluster").await?;
    // JetStream answers once the cluster has elected its meta leader.
    let js = bus.jetstream();
    let deadline = Instant::now() + Duration::from_secs(30);
    while js.query_account().await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "JetStream never came up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = workload(100, 1_000);
    let total = events.len() as u64;
    let mut reference = SessionTable::new(TableLimits::default());
    for e in &events {
        reference.apply(e, 0);
    }
    let stop = Shutdown::new();
    let running = start_session_state_with(&urls, stop.clone(), &["--js-replicas", "3"]).await?;
    let publisher_stop = Shutdown::new();
    let (sink, task) = spawn_publisher(
        bus.clone(),
        SHARDS,
        PublishConfig {
            buffer: 8192,
            acks: true,
            window: 64,
            ack_timeout: Duration::from_millis(500),
        },
        publisher_stop.clone(),
    );
    let name = jetstream::events_stream_name(&bus.subjects);
    let stored = || async {
        let mut stream = bus.jetstream().get_stream(&name).await?;
        let info = stream.info().await?;
        anyhow::Ok((
            info.state.messages,
            info.cluster.clone().and_then(|c| c.leader),
        ))
    };
    let until_stored = |n: u64| async move {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((m, _)) = stored().await
                && m >= n
            {
                return anyhow::Ok(m);
            }
            anyhow::ensure!(Instant::now() < deadline, "fewer than {n} events stored");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };

    let half = events.len() / 2;
    for e in &events[..half] {
        sink.emit(e.clone(), tracing::Span::none());
    }
    until_stored(half as u64).await?;
    drained(&bus).await?;
    let (_, leader) = stored().await?;
    let leader = leader.ok_or_else(|| anyhow::anyhow!("the events stream has no leader"))?;
    anyhow::ensure!(cluster.kill(&leader), "no node named {leader}");

    for e in &events[half..] {
        sink.emit(e.clone(), tracing::Span::none());
    }
    let got = until_stored(total).await?;
    assert_eq!(got, total, "an event stored twice");
    drained(&bus).await?;
    same_totals_as_reference(&bus, &reference, 100).await?;
    assert_eq!(sink.counters.dropped.get(), 0);
    let (_, new_leader) = stored().await?;
    assert_ne!(new_leader.as_deref(), Some(leader.as_str()));

    publisher_stop.cancel();
    task.await?;
    stop.cancel();
    running.join().await;
    Ok(())
}

/// The ingress's publisher against a stream that refuses what it cannot
/// take (at most 10 messages, discard new) until raised: with
/// acknowledgements the refused events are sent again and the stream ends
/// with each one exactly once; with core publishes the refused ones are lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacknowledged_events_are_sent_again_and_stored_once() -> anyhow::Result<()> {
    use async_nats::jetstream::stream::{Config, DiscardPolicy};
    use tether_ingress::events::{PublishConfig, spawn_publisher};

    let nats = NatsServer::start()?;
    let bus = test_bus(&nats.url()).await?;
    let js = bus.jetstream();
    let name = jetstream::events_stream_name(&bus.subjects);
    let tight = Config {
        name: name.clone(),
        subjects: vec![format!("{}.events.>", bus.subjects.prefix())],
        max_messages: 10,
        discard: DiscardPolicy::New,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let events = workload(5, 20);
    let total = events.len() as u64;

    let stored = |js: jetstream::Context| {
        let name = name.clone();
        async move {
            let mut stream = js.get_stream(&name).await?;
            anyhow::Ok(stream.info().await?.state.messages)
        }
    };
    let publish_all = |acks: bool| {
        let bus = bus.clone();
        let events = events.clone();
        async move {
            let stop = Shutdown::new();
            let (sink, task) = spawn_publisher(
                bus,
                SHARDS,
                PublishConfig {
                    buffer: 1024,
                    acks,
                    window: 8,
                    ack_timeout: Duration::from_millis(500),
                },
                stop.clone(),
            );
            for e in events {
                sink.emit(e, tracing::Span::none());
            }
            (sink, task, stop)
        }
    };

    // Core publishes: the stream keeps the 10 it has room for, the rest are gone.
    js.create_stream(tight.clone()).await?;
    let (sink, task, stop) = publish_all(false).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored(js.clone()).await? < 10 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "core publishes never reached the stream"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    task.await?;
    assert_eq!(stored(js.clone()).await?, 10);
    assert_eq!(sink.counters.retried.get(), 0);

    // Acknowledged: refused events are retried until the stream has room.
    js.delete_stream(&name).await?;
    js.create_stream(tight.clone()).await?;
    let (sink, task, stop) = publish_all(true).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while sink.counters.retried.get() < 3 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "refused events were not sent again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stored(js.clone()).await?, 10);
    js.update_stream(Config {
        max_messages: -1,
        ..tight.clone()
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while stored(js.clone()).await? < total {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {total} events stored",
            stored(js.clone()).await?
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    task.await?;
    assert_eq!(stored(js.clone()).await?, total, "an event stored twice");
    assert_eq!(sink.counters.dropped.get(), 0);
    Ok(())
}

/// `--nats-url` takes a comma-separated list of servers (a cluster's
/// nodes): a client given one dead and one live server connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_of_servers_connects_to_the_one_that_is_up() -> anyhow::Result<()> {
    let nats = NatsServer::start()?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let bus = test_bus(&format!("nats://127.0.0.1:{dead}, {}", nats.url())).await?;
    until_connected(&bus, "never connected to the live server").await?;
    let mut sub = bus.client.subscribe("list.test").await?;
    bus.client.publish("list.test", "hello".into()).await?;
    let got =
        tokio::time::timeout(Duration::from_secs(5), futures::StreamExt::next(&mut sub)).await?;
    assert_eq!(got.map(|m| m.payload.to_vec()), Some(b"hello".to_vec()));
    Ok(())
}

/// Waits (up to 20 s) until `bus` is connected; `what` names the failure.
async fn until_connected(bus: &Bus, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !bus.is_connected() {
        anyhow::ensure!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
