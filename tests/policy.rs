//! The scheduling policy through the whole system: the gateway queue orders
//! by attained service, the engine-side priority reaches a priority-capable
//! engine, and parallel calls raise a session's critical path by the longest.

use std::time::{Duration, Instant};
use tether_protocol::{EventKind, Finished, Outcome, RequestEvent, SessionKey, Subjects, shard_of};
use tether_universe::tether_testkit::http;
use tether_universe::{MODEL, Options, Universe};

/// Publishes a finished call for a session straight onto the bus, as an
/// ingress would, so it has `executed` seconds of attained service.
async fn give_service(u: &Universe, key: &str, executed: f64) -> anyhow::Result<()> {
    let bus = tether_bus::Bus::connect(
        &tether_bus::BusConfig {
            url: u.nats.url(),
            name: "test".into(),
        },
        Subjects::default(),
    )
    .await?;
    let key = SessionKey::explicit(key)?;
    let event = RequestEvent {
        call_id: 1,
        session_hash: key.hash(),
        session_key: key.as_str().into(),
        at_ms: tether_protocol::now_ms(),
        engine: "sim-0".into(),
        kind: EventKind::Finished(Finished {
            inherited_cst: 0.0,
            executed,
            waited: 0.0,
            wall: executed,
            prompt_tokens: 0,
            cached_tokens: 0,
            completion_tokens: 0,
            outcome: Outcome::Ok,
        }),
    };
    bus.publish(bus.subjects.events(shard_of(key.hash(), u.shards)), &event)
        .await?;
    bus.client.flush().await?;
    Ok(())
}

/// Waits until `cond` holds of the ingress's gate for engine 0.
async fn until_gate(
    u: &Universe,
    what: &str,
    cond: impl Fn(usize, usize) -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (in_use, _, waiting) = u.ingress.app.gateway.usage(0);
        if cond(in_use, waiting) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: in use {in_use}, waiting {waiting}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_session_overtakes_a_heavy_one_in_the_gateway_queue() -> anyhow::Result<()> {
    let u = Universe::start(Options {
        engines: 1,
        max_concurrency: 1,
        // Every session counts as a program here, so that levels apply.
        ingress_args: vec!["--program-headers".into(), "x-session-id".into()],
        ..Options::default()
    })
    .await?;
    give_service(&u, "heavy", 100.0).await?;
    // The scheduler learns of it through session-state's deltas.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = u.chat(Some("heavy"), "probe", 1).await?;
        assert_eq!(r.status, 200, "{}", r.text());
        if r.header("x-tether-priority") == Some("4") {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "heavy never reached the last level"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A long call holds the engine's only slot.
    let body = serde_json::json!({"model": MODEL, "max_tokens": 20000, "stream": true,
        "messages": [{"role": "user", "content": "hold the slot"}]});
    let blocker = http::send(
        &u.http,
        http::Method::POST,
        &u.url("/v1/chat/completions"),
        &[("x-session-id", "blocker")],
        serde_json::to_vec(&body)?,
    )
    .await?;
    assert_eq!(blocker.status(), 200);
    until_gate(&u, "blocker holds the slot", |used, _| used == 1).await?;

    // The heavy session queues first, then a fresh one.
    let heavy = {
        let (client, url) = (u.http.clone(), u.url("/v1/chat/completions"));
        tokio::spawn(async move {
            let body = serde_json::json!({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "heavy"}]});
            let r = http::post_json(&client, &url, &[("x-session-id", "heavy")], &body).await;
            (r.map(|r| r.status), Instant::now())
        })
    };
    until_gate(&u, "heavy queued", |_, waiting| waiting == 1).await?;
    let fresh = {
        let (client, url) = (u.http.clone(), u.url("/v1/chat/completions"));
        tokio::spawn(async move {
            let body = serde_json::json!({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "fresh"}]});
            let r = http::post_json(&client, &url, &[("x-session-id", "fresh")], &body).await;
            (r.map(|r| r.status), Instant::now())
        })
    };
    until_gate(&u, "fresh queued", |_, waiting| waiting == 2).await?;

    // Free the slot: the fresh session's call goes first.
    drop(blocker);
    let (heavy, fresh) = (heavy.await?, fresh.await?);
    assert_eq!(heavy.0.ok(), Some(200));
    assert_eq!(fresh.0.ok(), Some(200));
    assert!(
        fresh.1 < heavy.1,
        "the heavy session's queued call ran before the fresh one"
    );
    // The time spent queued is the calls' wait.
    let v = u
        .session_until("fresh", |v| v["in_flight"] == 0 && v["requests"] == 1)
        .await?;
    assert!(v["wait_s"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_calls_raise_the_critical_path_by_the_longest() -> anyhow::Result<()> {
    let u = Universe::start(Options::default()).await?;
    let lengths = [20u32, 30, 40, 60];
    let calls = lengths.iter().map(|n| {
        let (client, url) = (u.http.clone(), u.url("/v1/chat/completions"));
        let n = *n;
        tokio::spawn(async move {
            let body = serde_json::json!({"model": MODEL, "max_tokens": n,
                "messages": [{"role": "user", "content": format!("branch {n}")}]});
            http::post_json(&client, &url, &[("x-session-id", "fan-out")], &body).await
        })
    });
    let mut executed = Vec::new();
    for c in calls.collect::<Vec<_>>() {
        let r = c.await??;
        assert_eq!(r.status, 200, "{}", r.text());
        let usage = &r.json()["usage"];
        let prompt = usage["prompt_tokens"].as_f64().unwrap_or(0.0);
        let cached = usage["prompt_tokens_details"]["cached_tokens"]
            .as_f64()
            .unwrap_or(0.0);
        let completion = usage["completion_tokens"].as_f64().unwrap_or(0.0);
        // The ingress's default cost model.
        executed.push(0.0001 * (prompt - cached) + 0.01 * completion);
    }
    let longest = executed.iter().copied().fold(0.0, f64::max);
    let sum: f64 = executed.iter().sum();
    let v = u
        .session_until("fan-out", |v| v["requests"] == 4 && v["in_flight"] == 0)
        .await?;
    let cst = v["critical_path_service_s"].as_f64().unwrap_or(-1.0);
    let attained = v["attained_service_s"].as_f64().unwrap_or(-1.0);
    assert!(
        (cst - longest).abs() < 1e-9,
        "critical path {cst}, longest call {longest}, all {executed:?}"
    );
    assert!(
        (attained - sum).abs() < 1e-9,
        "attained {attained}, sum {sum}"
    );
    assert!(cst < attained);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_priority_field_reaches_a_priority_capable_engine() -> anyhow::Result<()> {
    let u = Universe::start(Options {
        engines: 1,
        priority_engines: vec![0],
        ingress_args: vec!["--program-headers".into(), "x-session-id".into()],
        ..Options::default()
    })
    .await?;
    give_service(&u, "long-runner", 100.0).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = u.chat(Some("long-runner"), "probe", 1).await?;
        assert_eq!(r.status, 200, "{}", r.text());
        if r.header("x-tether-priority") == Some("4") {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "never reached the last level");
    }
    let r = u.chat(Some("newcomer"), "hello", 1).await?;
    assert_eq!(r.header("x-tether-priority"), Some("0"));
    // The engine counts the requests by the priority field it received.
    let text = http::get(&u.http, &format!("http://{}/metrics", u.engine_addrs[0]))
        .await?
        .text();
    let by = |p: &str| {
        tether_universe::metric_sum(
            &text,
            "tether_sim_requests_by_priority",
            &format!("priority=\"{p}\""),
        )
    };
    assert!(
        by("4") >= 1.0,
        "no request reached the engine with priority 4:\n{text}"
    );
    assert!(by("0") >= 1.0);
    Ok(())
}
