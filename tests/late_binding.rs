//! The gateway queue through the whole system: late binding (a call queued
//! for a busy engine moves to an idle one once it has waited longer than its
//! cache would save; one whose engine frees in time stays) and capacity
//! control (the engine's own waiting queue stays near empty under a burst).

use std::time::{Duration, Instant};
use tether_universe::tether_testkit::http;
use tether_universe::{MODEL, Options, Universe};

/// A prompt of about `tokens` tokens (4 bytes each) that opens with `tag`.
fn prompt(tag: &str, tokens: usize) -> String {
    let mut s = format!("{tag} ");
    while s.len() < tokens * 4 {
        s.push_str("lorem ipsum dolor sit amet ");
    }
    s
}

fn body(content: &str, max_tokens: u32, stream: bool) -> Vec<u8> {
    serde_json::to_vec(
        &serde_json::json!({"model": MODEL, "max_tokens": max_tokens,
        "stream": stream, "messages": [{"role": "user", "content": content}]}),
    )
    .unwrap_or_default()
}

/// A non-streamed call of session `doc` with `content`.
async fn call_doc(
    u_http: &http::HttpClient,
    url: &str,
    content: &str,
) -> anyhow::Result<http::Reply> {
    http::fetch(
        u_http,
        http::Method::POST,
        url,
        &[("x-session-id", "doc")],
        body(content, 1, false),
    )
    .await
}

async fn until(what: &str, cond: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Two engines of one slot each. Session `doc` runs once, so its prompt's
/// blocks are known to be on engine A. A long call then holds A's slot, and
/// `doc` comes back with the same prompt: the scheduler prefers A, the
/// gateway holds the call for A as long as the prefill its cache saves
/// (0.0001 s × 10,000 tokens = 1 s), then sends it to idle B.
/// The blocker's response is returned as `Any`: dropping it hangs up.
async fn setup() -> anyhow::Result<(Universe, String, String, Box<dyn std::any::Any + Send>)> {
    let u = Universe::start(Options {
        engines: 2,
        max_concurrency: 1,
        // A fixed limit: this test is about binding, not capacity.
        ingress_args: vec!["--capacity-control".into(), "false".into()],
        ..Options::default()
    })
    .await?;
    let doc = prompt("shared document", 10_000);
    let first = call_doc(&u.http, &u.url("/v1/chat/completions"), &doc).await?;
    anyhow::ensure!(first.status == 200, "first call: {}", first.text());
    let a = engine_of(&first);
    // A streamed call of the same session holds A's only slot.
    let blocker = http::send(
        &u.http,
        http::Method::POST,
        &u.url("/v1/chat/completions"),
        &[("x-session-id", "doc")],
        body(&doc, 20_000, true),
    )
    .await?;
    anyhow::ensure!(blocker.status() == 200);
    let held = blocker
        .headers()
        .get("x-tether-engine")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    anyhow::ensure!(held == a, "the blocker went to {held}, not {a}");
    Ok((u, a, doc, Box::new(blocker)))
}

fn engine_of(r: &http::Reply) -> String {
    r.header("x-tether-engine").unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_queued_for_a_busy_engine_moves_to_an_idle_one_after_its_delay() -> anyhow::Result<()>
{
    let (u, a, doc, blocker) = setup().await?;
    let a_idx = u.fleet.index_of(&a).unwrap_or(0);
    let started = Instant::now();
    let r = call_doc(&u.http, &u.url("/v1/chat/completions"), &doc).await?;
    let waited = started.elapsed();
    assert_eq!(r.status, 200, "{}", r.text());
    let ran_on = engine_of(&r);
    assert_ne!(ran_on, a, "it stayed on its busy engine");
    // It waited for its cache first (the bind delay is 1 s; allow for
    // the 4-byte token estimate).
    assert!(
        waited >= Duration::from_millis(700),
        "moved after only {waited:?}"
    );
    // The blocker still holds A: the move did not take A's slot.
    assert_eq!(u.ingress.app.gateway.usage(a_idx).0, 1);
    let moved = tether_universe::metric_sum(
        &http::get(&u.http, &u.url("/metrics")).await?.text(),
        "tether_ingress_bindings_total",
        "binding=\"moved\"",
    );
    assert_eq!(moved, 1.0);
    drop(blocker);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_whose_engine_frees_in_time_stays() -> anyhow::Result<()> {
    let (u, a, doc, blocker) = setup().await?;
    let a_idx = u.fleet.index_of(&a).unwrap_or(0);
    let (client, url) = (u.http.clone(), u.url("/v1/chat/completions"));
    let call = tokio::spawn(async move {
        call_doc(&client, &url, &doc)
            .await
            .map(|r| (r.status, engine_of(&r)))
    });
    until("the call waits at the gateway", || {
        u.ingress.app.gateway.usage(a_idx).2 == 1
    })
    .await?;
    // The blocker's client goes away well inside the delay: A frees.
    drop(blocker);
    let (status, ran_on) = call.await??;
    assert_eq!(status, 200);
    assert_eq!(ran_on, a, "it left the engine holding its cache");
    Ok(())
}

/// One engine that runs 4 sequences at once and a fleet file that allows
/// 256. A first burst teaches the gateway the engine's capacity (from its
/// metrics); during a second burst the calls wait at the gateway, not in
/// the engine: its waiting queue stays near empty while all are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capacity_control_keeps_the_engine_queue_near_empty_under_a_burst() -> anyhow::Result<()> {
    let u = Universe::start(Options {
        engines: 1,
        sim: |_, c| c.max_num_seqs = 4,
        ingress_args: vec![
            "--capacity-control".into(),
            "true".into(),
            "--capacity-interval-ms".into(),
            "20".into(),
        ],
        ..Options::default()
    })
    .await?;
    let burst =
        |n: usize, tag: &'static str| -> Vec<tokio::task::JoinHandle<anyhow::Result<u16>>> {
            (0..n)
                .map(|i| {
                    let (client, url) = (u.http.clone(), u.url("/v1/chat/completions"));
                    tokio::spawn(async move {
                        http::fetch(
                            &client,
                            http::Method::POST,
                            &url,
                            &[("x-session-id", &format!("{tag}-{i}"))],
                            body(&format!("{tag} call {i}"), 40, false),
                        )
                        .await
                        .map(|r| r.status)
                    })
                })
                .collect()
        };
    let metrics = format!("http://{}/metrics", u.engine_addrs[0]);
    let engine_waiting = || async {
        http::get(&u.http, &metrics)
            .await
            .map(|r| tether_universe::metric_sum(&r.text(), "vllm:num_requests_waiting", ""))
    };
    // The first burst lands in the engine's queue; the limit comes down to
    // what the engine runs (plus one staged).
    let first = burst(24, "first");
    until("the limit comes down", || {
        u.ingress.app.gateway.usage(0).1 <= 6
    })
    .await?;
    for c in first {
        assert_eq!(c.await??, 200);
    }
    let limit = u.ingress.app.gateway.usage(0).1;
    // The second burst waits at the gateway.
    let second = burst(32, "second");
    until("calls wait at the gateway", || {
        u.ingress.app.gateway.waiting() > 0
    })
    .await?;
    let (mut most, mut sum, mut samples) = (0.0f64, 0.0, 0u32);
    while u.ingress.app.gateway.waiting() > 0 {
        let w = engine_waiting().await?;
        most = most.max(w);
        sum += w;
        samples += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for c in second {
        assert_eq!(c.await??, 200);
    }
    assert!(samples > 0);
    let mean = sum / f64::from(samples);
    // Without the control all 32 - 4 would wait in the engine. A call sent
    // as another ends shows as waiting until the engine's next step, so a
    // few may be seen at an instant, more on a busy machine (a mean of 3.04
    // was seen at a load average of 6): the bounds are far below 28, not
    // tight around what a quiet machine shows.
    assert!(
        most <= 14.0 && mean <= 7.0,
        "the engine queued up to {most} calls (mean {mean:.2}, {samples} samples, limit {limit})"
    );
    Ok(())
}
