//! Faults and abuse: engines that die, hang or break their streams; the
//! scheduler gone; hostile HTTP clients; and a NATS server configured with
//! the shipped accounts and permissions (deploy/nats/tether.conf). Everything
//! real: nats-server, engine-sims and HTTP servers on loopback.

use futures::StreamExt;
use http_body_util::BodyExt;
use std::time::{Duration, Instant};
use tether_protocol::{EventKind, Outcome, RequestEvent};
use tether_universe::tether_testkit::http;
use tether_universe::{MODEL, Options, Universe};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn start(opts: Options) -> Universe {
    match Universe::start(opts).await {
        Ok(u) => u,
        Err(e) => panic!("universe did not start: {e:#}"),
    }
}

fn engine_of(r: &http::Reply) -> String {
    assert_eq!(r.status, 200, "call failed: {}", r.text());
    r.header("x-tether-engine").unwrap_or_default().to_owned()
}

fn chat_body(content: &str, stream: bool) -> serde_json::Value {
    serde_json::json!({
        "model": MODEL, "max_tokens": 4, "stream": stream,
        "messages": [{"role": "user", "content": content}],
    })
}

/// Every Finished event on the bus, collected until the returned task is aborted.
async fn finished_events(
    u: &Universe,
) -> anyhow::Result<tokio::sync::mpsc::UnboundedReceiver<RequestEvent>> {
    let bus = tether_bus::Bus::connect(
        &tether_bus::BusConfig {
            url: u.nats.url(),
            name: "test-listener".into(),
        },
        tether_protocol::Subjects::default(),
    )
    .await?;
    let mut sub = bus.subscribe(bus.subjects.events_all()).await?;
    bus.client.flush().await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Some(ev) = bus.decode::<RequestEvent>(&msg, "events")
                && matches!(ev.kind, EventKind::Finished(_))
                && tx.send(ev).is_err()
            {
                return;
            }
        }
    });
    Ok(rx)
}

async fn next_finished(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<RequestEvent>,
) -> anyhow::Result<(RequestEvent, Outcome)> {
    let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("event stream ended"))?;
    let EventKind::Finished(f) = &ev.kind else {
        anyhow::bail!("not a Finished event")
    };
    let outcome = f.outcome;
    Ok((ev, outcome))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successful_calls_are_recorded_ok() -> anyhow::Result<()> {
    let u = start(Options {
        engines: 1,
        ..Options::default()
    })
    .await;
    let mut events = finished_events(&u).await?;
    for (i, stream) in [false, true].into_iter().enumerate() {
        let r = http::post_json(
            &u.http,
            &u.url("/v1/chat/completions"),
            &[("x-session-id", &format!("ok-{i}"))],
            &chat_body("hello", stream),
        )
        .await?;
        engine_of(&r);
        let (ev, outcome) = next_finished(&mut events).await?;
        assert_eq!(ev.session_key, format!("ok-{i}"));
        assert_eq!(outcome, Outcome::Ok, "stream={stream}: {ev:?}");
    }
    assert_eq!(
        u.ingress_metric("tether_ingress_calls", "outcome=\"ok\"")
            .await?,
        2.0
    );
    assert_eq!(
        u.ingress_metric("tether_ingress_calls", "outcome=\"cancelled\"")
            .await?,
        0.0
    );
    Ok(())
}

/// How a misbehaving engine answers chat calls (it answers `/health` and
/// `/metrics` like a good one).
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    /// Reads the call, then closes the connection without a word.
    Dies,
    /// Reads the call and never answers.
    Hangs,
    /// Answers 500.
    Fails,
    /// Starts a 200 SSE stream, sends one event, then drops the connection.
    CutsStreams,
}

/// A bad engine on loopback, stopped when dropped.
struct BadEngine {
    url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BadEngine {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn bad_engine(how: Misbehaviour) -> anyhow::Result<BadEngine> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        while let Ok((tcp, _)) = listener.accept().await {
            conns.spawn(serve_bad(tcp, how));
        }
    });
    Ok(BadEngine { url, task })
}

async fn serve_bad(mut tcp: TcpStream, how: Misbehaviour) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if head.starts_with("get ") {
        let body = if head.starts_with("get /health") {
            "ok"
        } else {
            ""
        };
        let _ = tcp
            .write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            )
            .await;
        return;
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buf.len() < head_end + len {
        match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    match how {
        Misbehaviour::Dies => {}
        Misbehaviour::Hangs => std::future::pending::<()>().await,
        Misbehaviour::Fails => {
            let body = r#"{"error":{"message":"boom"}}"#;
            let _ = tcp
                .write_all(
                    format!(
                        "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        }
        Misbehaviour::CutsStreams => {
            let event = "data: {\"choices\":[{\"delta\":{\"content\":\"par\"}}]}\n\n";
            let _ = tcp
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{event}\r\n",
                        event.len()
                    )
                    .as_bytes(),
                )
                .await;
            let _ = tcp.flush().await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Dropping the socket closes the connection.
}

/// A universe of one good engine-sim (`sim-0`) and one bad engine (`bad`).
async fn with_bad(
    how: Misbehaviour,
    ingress_args: &[&str],
) -> anyhow::Result<(Universe, BadEngine)> {
    let bad = bad_engine(how).await?;
    let u = start(Options {
        engines: 1,
        extra_engines: vec![("bad".into(), bad.url.clone())],
        ingress_args: ingress_args.iter().map(|s| (*s).to_owned()).collect(),
        ..Options::default()
    })
    .await;
    Ok((u, bad))
}

/// Sends new sessions until one call was retried; returns its session.
async fn until_retried(u: &Universe, stream: bool) -> anyhow::Result<String> {
    for i in 0..40 {
        let before = u.ingress_metric("tether_ingress_retries", "").await?;
        let session = format!("retry-{stream}-{i}");
        let r = http::post_json(
            &u.http,
            &u.url("/v1/chat/completions"),
            &[("x-session-id", &session)],
            &chat_body("hi", stream),
        )
        .await?;
        assert_eq!(
            engine_of(&r),
            "sim-0",
            "served by a bad engine: {}",
            r.text()
        );
        if u.ingress_metric("tether_ingress_retries", "").await? > before {
            return Ok(session);
        }
    }
    anyhow::bail!("no call ever went to the bad engine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_retried_elsewhere_before_the_first_byte() -> anyhow::Result<()> {
    for how in [Misbehaviour::Dies, Misbehaviour::Fails] {
        let (u, _bad) = with_bad(how, &["--breaker-failures", "0"]).await?;
        let mut events = finished_events(&u).await?;
        let session = until_retried(&u, false).await?;
        // The Finished event names the engine that served, and its affinity
        // followed the call there, not to the engine that failed.
        loop {
            let (ev, outcome) = next_finished(&mut events).await?;
            if ev.session_key == session {
                assert_eq!(ev.engine, "sim-0", "{how:?}");
                assert_eq!(outcome, Outcome::Ok, "{how:?}");
                break;
            }
        }
        let v = u.session_until(&session, |v| v["in_flight"] == 0).await?;
        assert_eq!(v["affinity"], "sim-0", "{how:?}: {v}");
        // A retried call is counted once, as ok.
        assert_eq!(
            u.ingress_metric("tether_ingress_calls", "outcome=\"engine_error\"")
                .await?,
            0.0
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_engine_is_timed_out_retried_and_ejected() -> anyhow::Result<()> {
    let (u, _bad) = with_bad(
        Misbehaviour::Hangs,
        &[
            "--engine-ttfb-timeout-secs",
            "0.3",
            "--breaker-failures",
            "2",
            "--breaker-cooldown-ms",
            "600000",
        ],
    )
    .await?;
    // Streaming calls wait at most the TTFB timeout on the hung engine.
    until_retried(&u, true).await?;
    until_retried(&u, true).await?;
    // Two consecutive failures: ejected, and no call goes there any more.
    assert_eq!(
        u.ingress_metric("tether_ingress_engine_ejections", "engine=\"bad\"")
            .await?,
        1.0
    );
    let retries = u.ingress_metric("tether_ingress_retries", "").await?;
    for i in 0..10 {
        let r = u.chat(Some(&format!("after-{i}")), "hi", 2).await?;
        assert_eq!(engine_of(&r), "sim-0");
    }
    assert_eq!(
        u.ingress_metric("tether_ingress_retries", "").await?,
        retries
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_cut_after_its_first_byte_ends_with_an_error_event() -> anyhow::Result<()> {
    let bad = bad_engine(Misbehaviour::CutsStreams).await?;
    let u = start(Options {
        engines: 0,
        extra_engines: vec![("bad".into(), bad.url.clone())],
        ..Options::default()
    })
    .await;
    let resp = http::send(
        &u.http,
        http::Method::POST,
        &u.url("/v1/chat/completions"),
        &[("x-session-id", "cut")],
        serde_json::to_vec(&chat_body("hi", true))?,
    )
    .await?;
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await?.to_bytes();
    let text = String::from_utf8_lossy(&body);
    let last = text
        .split("\n\n")
        .filter(|e| !e.trim().is_empty())
        .last()
        .unwrap_or_default();
    let json: serde_json::Value =
        serde_json::from_str(last.trim_start_matches("data: ")).unwrap_or_default();
    assert_eq!(json["error"]["code"], "stream_interrupted", "{text}");
    assert!(text.starts_with("data: {\"choices\""), "{text}");
    assert!(!text.contains("[DONE]"));
    assert_eq!(
        u.ingress_metric("tether_ingress_calls", "outcome=\"engine_error\"")
            .await?,
        1.0
    );
    drop(bad);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_route_keeps_sessions_on_their_engine() -> anyhow::Result<()> {
    let mut u = start(Options::default()).await;
    let mut engines = Vec::new();
    for i in 0..16 {
        let r = u.chat(Some(&format!("keep-{i}")), "first", 2).await?;
        engines.push(engine_of(&r));
    }
    u.stop_scheduler().await;
    for (i, engine) in engines.iter().enumerate() {
        let r = u.chat(Some(&format!("keep-{i}")), "second", 2).await?;
        assert_eq!(r.header("x-tether-route"), Some("fallback"));
        assert_eq!(&engine_of(&r), engine, "session keep-{i} moved");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_call_is_counted_once() -> anyhow::Result<()> {
    let bad = bad_engine(Misbehaviour::Fails).await?;
    let u = start(Options {
        engines: 0,
        extra_engines: vec![("bad".into(), bad.url.clone())],
        ..Options::default()
    })
    .await;
    let r = u.chat(Some("fails"), "hi", 2).await?;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["error"]["code"], "engine_failed");
    assert_eq!(u.ingress_metric("tether_ingress_calls", "").await?, 1.0);
    drop(bad);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_http_clients_are_bounded() -> anyhow::Result<()> {
    let u = start(Options {
        engines: 1,
        ingress_args: [
            "--header-read-timeout-secs",
            "1",
            "--max-buffered-body-bytes",
            "1000",
            "--admin-listen",
            "127.0.0.1:0",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect(),
        ..Options::default()
    })
    .await;
    // A silent connection and a slowloris one are closed.
    let mut silent = TcpStream::connect(u.ingress.addr).await?;
    let mut slow = TcpStream::connect(u.ingress.addr).await?;
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await?;
    for conn in [&mut silent, &mut slow] {
        let mut buf = [0u8; 256];
        // Closed (0 bytes, or an error answer then closed) rather than held open.
        let closed = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match conn.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "the connection was held open");
    }

    // One call holds 900 of the 1000 buffered bytes: the next is refused
    // with 503 and Retry-After until it is gone.
    let mut holder = TcpStream::connect(u.ingress.addr).await?;
    holder
        .write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100000\r\n\r\n{}",
                " ".repeat(900)
            )
            .as_bytes(),
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let r = u.chat(Some("busy"), &"x".repeat(200), 2).await?;
        if r.status == 503 {
            break r;
        }
        anyhow::ensure!(Instant::now() < deadline, "never refused: {}", r.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(refused.json()["error"]["code"], "server_busy");
    assert!(refused.header("retry-after").is_some());
    drop(holder);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = u.chat(Some("busy"), &"x".repeat(200), 2).await?;
        if r.status == 200 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "budget never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // /metrics and the session view are on the admin listener only.
    let admin = u
        .ingress
        .admin_addr
        .ok_or_else(|| anyhow::anyhow!("no admin listener"))?;
    assert_eq!(http::get(&u.http, &u.url("/metrics")).await?.status, 404);
    assert_eq!(
        http::get(&u.http, &u.url("/v1/tether/sessions/busy"))
            .await?
            .status,
        404
    );
    assert_eq!(http::get(&u.http, &u.url("/ready")).await?.status, 200);
    let metrics = http::get(&u.http, &format!("http://{admin}/metrics")).await?;
    assert!(metrics.text().contains("tether_ingress_body_busy"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = http::get(&u.http, &format!("http://{admin}/v1/tether/sessions/busy")).await?;
        if r.status == 200 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "session view: {}", r.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
