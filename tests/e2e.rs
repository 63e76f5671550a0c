//! End-to-end tests of the whole system: real nats-server, real HTTP, real
//! streaming, engine-sims on loopback, the services in-process.

use bytes::Bytes;
use http_body_util::BodyExt;
use std::collections::HashSet;
use std::time::Duration;
use tether_protocol::{EventKind, Finished, Outcome, RequestEvent, SessionKey, Subjects, shard_of};
use tether_universe::tether_testkit::http;
use tether_universe::{MODEL, Options, Universe, metric_sum};

async fn universe() -> Universe {
    match Universe::start(Options::default()).await {
        Ok(u) => u,
        Err(e) => panic!("universe did not start: {e:#}"),
    }
}

fn engine_of(r: &http::Reply) -> String {
    assert_eq!(r.status, 200, "call failed: {}", r.text());
    r.header("x-tether-engine").unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turns_of_a_session_stay_on_one_engine() -> anyhow::Result<()> {
    let u = universe().await;
    let first = u.chat(Some("alpha"), "hello", 4).await?;
    let engine = engine_of(&first);
    assert_eq!(first.header("x-tether-session"), Some("alpha"));
    assert!(first.header("x-tether-priority").is_some());
    assert_eq!(first.json()["object"], "chat.completion");
    for turn in 0..4 {
        let r = u.chat(Some("alpha"), &format!("turn {turn}"), 4).await?;
        assert_eq!(engine_of(&r), engine, "turn {turn} moved");
        assert_eq!(r.header("x-tether-route"), Some("affinity"));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_sessions_go_to_the_least_loaded_engine() -> anyhow::Result<()> {
    let u = universe().await;
    // Three long calls of three new sessions hold three engines busy.
    let mut held = Vec::new();
    let mut busy = HashSet::new();
    for i in 0..3 {
        let body = serde_json::json!({"model": MODEL, "max_tokens": 20000, "stream": true,
            "messages": [{"role": "user", "content": format!("long {i}")}]});
        let resp = http::send(
            &u.http,
            http::Method::POST,
            &u.url("/v1/chat/completions"),
            &[("x-session-id", &format!("long-{i}"))],
            serde_json::to_vec(&body)?,
        )
        .await?;
        assert_eq!(resp.status(), 200);
        let engine = resp
            .headers()
            .get("x-tether-engine")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            busy.insert(engine.clone()),
            "two new sessions were put on {engine} while others were idle"
        );
        held.push(resp);
    }
    // A fourth new session must go to the one idle engine.
    let r = u.chat(Some("fresh"), "hi", 2).await?;
    let engine = engine_of(&r);
    assert!(
        !busy.contains(&engine),
        "new session went to busy engine {engine}"
    );
    assert_eq!(r.header("x-tether-route"), Some("least-loaded"));
    drop(held);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_view_shows_what_the_events_carried() -> anyhow::Result<()> {
    let u = universe().await;
    // Events published straight onto the bus, as any ingress would.
    let bus = tether_bus::Bus::connect(
        &tether_bus::BusConfig {
            url: u.nats.url(),
            name: "test".into(),
        },
        Subjects::default(),
    )
    .await?;
    let key = SessionKey::explicit("carried")?;
    let subject = bus.subjects.events(shard_of(key.hash(), u.shards));
    for (call, h, t, w) in [(1u64, 0.0, 5.0, 2.0), (2, 5.0, 3.0, 1.0)] {
        let event = RequestEvent {
            call_id: call,
            session_hash: key.hash(),
            session_key: key.as_str().into(),
            at_ms: tether_protocol::now_ms(),
            engine: "sim-2".into(),
            kind: EventKind::Finished(Finished {
                inherited_cst: h,
                executed: t,
                waited: w,
                wall: t,
                prompt_tokens: 1,
                cached_tokens: 0,
                completion_tokens: 1,
                outcome: Outcome::Ok,
            }),
        };
        bus.publish(subject.clone(), &event).await?;
    }
    bus.client.flush().await?;
    let v = u
        .session_until("carried", |v| v["critical_path_service_s"] == 8.0)
        .await?;
    assert_eq!(v["wait_s"], 3.0);
    assert_eq!(v["attained_service_s"], 8.0);
    assert_eq!(v["affinity"], "sim-2");

    // And a real call through the ingress is reflected too.
    let r = u.chat(Some("real"), "count me", 8).await?;
    let engine = engine_of(&r);
    let v = u
        .session_until("real", |v| v["in_flight"] == 0 && v["requests"] == 1)
        .await?;
    assert_eq!(v["affinity"], engine.as_str());
    let cst = v["critical_path_service_s"].as_f64().unwrap_or(-1.0);
    assert!(cst > 0.0, "service not measured: {v}");
    assert_eq!(v["attained_service_s"].as_f64(), Some(cst));
    assert!(v["wait_s"].as_f64().unwrap_or(-1.0) >= 0.0);
    // Unknown sessions are a clean 404.
    let missing = http::get(&u.http, &u.url("/v1/tether/sessions/nobody")).await?;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"]["code"], "session_not_found");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_pass_through_chunk_by_chunk() -> anyhow::Result<()> {
    let u = universe().await;
    let body = serde_json::json!({"model": MODEL, "max_tokens": 20000, "stream": true,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "stream please"}]});
    let resp = http::send(
        &u.http,
        http::Method::POST,
        &u.url("/v1/chat/completions"),
        &[("x-session-id", "streamer")],
        serde_json::to_vec(&body)?,
    )
    .await?;
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .starts_with("text/event-stream")
    );
    let engine = resp
        .headers()
        .get("x-tether-engine")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut body = resp.into_body();
    let first: Bytes = loop {
        let frame = body
            .frame()
            .await
            .ok_or_else(|| anyhow::anyhow!("stream ended without data"))??;
        if let Ok(data) = frame.into_data()
            && !data.is_empty()
        {
            break data;
        }
    };
    assert!(
        first.starts_with(b"data: {"),
        "first chunk: {:?}",
        String::from_utf8_lossy(&first)
    );
    // The engine is still generating this answer: the chunk was not held back
    // until the end.
    let idx = u.fleet.index_of(&engine).unwrap_or(0);
    let metrics = http::get(&u.http, &format!("http://{}/metrics", u.engine_addrs[idx]))
        .await?
        .text();
    assert!(
        metric_sum(&metrics, "vllm:num_requests_running", "") >= 1.0,
        "engine finished before the first chunk arrived"
    );
    drop(body);
    // The cancelled call ends up in the session as not in flight.
    u.session_until("streamer", |v| v["in_flight"] == 0 && v["requests"] == 1)
        .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_serving_without_scheduler_or_nats() -> anyhow::Result<()> {
    let mut u = universe().await;
    let r = u.chat(Some("sturdy"), "before", 2).await?;
    let engine = engine_of(&r);
    assert_ne!(r.header("x-tether-route"), Some("fallback"));

    // Scheduler gone: once the server has seen it unsubscribe, NATS answers
    // "no responders" at once (until then a request may time out instead).
    u.stop_scheduler().await;
    let no_responders = "reason=\"no_responders\"";
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while u
        .ingress_metric("tether_ingress_route_fallbacks", no_responders)
        .await?
        < 1.0
    {
        let r = u.chat(Some("settle"), "no scheduler", 2).await?;
        engine_of(&r);
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no-responders never seen"
        );
    }
    let before = u
        .ingress_metric("tether_ingress_route_fallbacks", no_responders)
        .await?;
    for i in 0..3 {
        let r = u.chat(Some(&format!("s-{i}")), "no scheduler", 2).await?;
        engine_of(&r);
        assert_eq!(r.header("x-tether-route"), Some("fallback"));
    }
    assert_eq!(
        u.ingress_metric("tether_ingress_route_fallbacks", no_responders)
            .await?,
        before + 3.0
    );

    // NATS gone too.
    u.nats.stop();
    let fallbacks_before = u
        .ingress_metric("tether_ingress_route_fallbacks", "")
        .await?;
    for i in 0..3 {
        let r = u.chat(Some(&format!("n-{i}")), "no nats", 2).await?;
        engine_of(&r);
        assert_eq!(r.header("x-tether-route"), Some("fallback"));
    }
    assert!(
        u.ingress_metric("tether_ingress_route_fallbacks", "")
            .await?
            >= fallbacks_before + 3.0
    );

    // Both come back; the system recovers by itself.
    u.nats.restart()?;
    u.restart_scheduler().await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = u.chat(Some("sturdy"), "after", 2).await?;
        // Recovered when the new scheduler routes by the session's state,
        // which session-state kept in memory through the outage.
        if r.header("x-tether-route") == Some("affinity") {
            assert_eq!(engine_of(&r), engine);
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "never recovered from the outage"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors() -> anyhow::Result<()> {
    let u = Universe::start(Options {
        ingress_args: vec!["--max-body-bytes".into(), "4096".into()],
        ..Options::default()
    })
    .await?;
    let url = u.url("/v1/chat/completions");

    let r = http::fetch(&u.http, http::Method::POST, &url, &[], "{not json").await?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert_eq!(r.json()["error"]["code"], "invalid_json");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );

    let r = http::post_json(
        &u.http,
        &url,
        &[],
        &serde_json::json!({"messages": [{"role": "user", "content": "x"}]}),
    )
    .await?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "missing_required_parameter");

    let huge = serde_json::json!({"model": MODEL, "messages": [{"role": "user", "content": "x".repeat(10_000)}]});
    let r = http::post_json(&u.http, &url, &[], &huge).await?;
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"]["code"], "request_too_large");

    let long_key = "k".repeat(300);
    let ok_body = serde_json::json!({"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]});
    let r = http::post_json(&u.http, &url, &[("x-session-id", &long_key)], &ok_body).await?;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_session_key");

    let r = http::post_json(&u.http, &url, &[], &serde_json::json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]})).await?;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["code"], "model_not_found");

    // Garbage on an events subject is counted and dropped; the shard keeps working.
    let raw = tether_bus::connect(&tether_bus::BusConfig {
        url: u.nats.url(),
        name: "garbage".into(),
    })
    .await?
    .0;
    let key = SessionKey::explicit("after-garbage")?;
    let shard = shard_of(key.hash(), u.shards);
    raw.publish(
        Subjects::default().events(shard),
        Bytes::from_static(b"\x07garbage"),
    )
    .await?;
    raw.flush().await?;
    let admin = format!("http://{}/metrics", u.session_state.admin_addr);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while metric_sum(
        &http::get(&u.http, &admin).await?.text(),
        "tether_bus_decode_errors",
        "kind=\"events\"",
    ) < 1.0
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "garbage was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = u.chat(Some("after-garbage"), "still there?", 2).await?;
    engine_of(&r);
    u.session_until("after-garbage", |v| {
        v["requests"] == 1 && v["in_flight"] == 0
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_implicit_sessions() -> anyhow::Result<()> {
    let u = universe().await;
    let m = http::get(&u.http, &u.url("/v1/models")).await?;
    assert_eq!(m.status, 200);
    assert_eq!(m.json()["data"][0]["id"], MODEL);

    // No key: the conversation's opening makes one, the same for every turn.
    let turn = |n: usize| {
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": "be brief"}),
            serde_json::json!({"role": "user", "content": "first question"}),
        ];
        for i in 0..n {
            messages
                .push(serde_json::json!({"role": "assistant", "content": format!("answer {i}")}));
            messages.push(serde_json::json!({"role": "user", "content": format!("follow-up {i}")}));
        }
        serde_json::json!({"model": MODEL, "max_tokens": 2, "messages": messages})
    };
    let url = u.url("/v1/chat/completions");
    let a = http::post_json(&u.http, &url, &[], &turn(0)).await?;
    let b = http::post_json(&u.http, &url, &[], &turn(2)).await?;
    let key = a.header("x-tether-session").unwrap_or_default().to_owned();
    assert!(key.starts_with("implicit-"), "{key}");
    assert_eq!(b.header("x-tether-session"), Some(key.as_str()));
    assert_eq!(engine_of(&a), engine_of(&b));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_replicas_share_the_work_and_each_holds_every_session() -> anyhow::Result<()> {
    let mut u = universe().await;
    let second = u.extra_scheduler().await?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !second.admin.is_ready() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "second replica never ready"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let first = u.chat(Some("replicated"), "turn one", 2).await?;
    let engine = engine_of(&first);
    // The session reaches the second replica through session-state's deltas.
    u.session_until("replicated", |v| v["requests"] == 1 && v["in_flight"] == 0)
        .await?;
    // Both replicas answer route requests (one queue group)...
    let decisions = |m: &str| metric_sum(m, "tether_scheduler_decisions", "");
    for i in 0..20 {
        engine_of(&u.chat(Some(&format!("spread-{i}")), "hi", 1).await?);
    }
    let second_metrics = http::get(&u.http, &format!("http://{}/metrics", second.admin_addr))
        .await?
        .text();
    assert!(
        decisions(&second_metrics) >= 1.0,
        "the second replica took no route request"
    );
    // ...and each holds every session: with the first gone, the second keeps
    // the session on its engine.
    u.stop_scheduler().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = u.chat(Some("replicated"), "turn two", 2).await?;
        if r.header("x-tether-route") == Some("affinity") {
            assert_eq!(engine_of(&r), engine);
            break;
        }
        // Until the server has seen the first replica leave, a request may
        // still go to it and fall back.
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the second replica never routed by affinity"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}
