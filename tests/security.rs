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
/// `/metrics` like a good one, its token counters standing at 0).
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    /// Reads the call, then closes the connection without a word.
    Dies,
    /// Reads the call and never answers.
    Hangs,
    /// Sends a 200 SSE stream's headers at once, then nothing (a hung
    /// engine that had already accepted the call).
    HangsAfterHeaders,
    /// Answers 500.
    Fails,
    /// Starts a 200 SSE stream, sends one event, then drops the connection.
    CutsStreams,
    /// Answers 500 until the flag is set, then a short chat completion.
    FailsUntil(&'static std::sync::atomic::AtomicBool),
    /// Reads the call and never answers; from then on (the flag set) its
    /// `/health` answers 503.
    HangsThenFailsHealth(&'static std::sync::atomic::AtomicBool),
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
        let down = matches!(how, Misbehaviour::HangsThenFailsHealth(flag)
            if flag.load(std::sync::atomic::Ordering::SeqCst));
        let (status, body) = if head.starts_with("get /health") {
            if down {
                ("503 Service Unavailable", "down")
            } else {
                ("200 OK", "ok")
            }
        } else if head.starts_with("get /metrics") {
            (
                "200 OK",
                "vllm:prompt_tokens_total{model_name=\"m\"} 0\nvllm:generation_tokens_total{model_name=\"m\"} 0\n",
            )
        } else {
            ("200 OK", "")
        };
        let _ = tcp
            .write_all(
                format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
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
        Misbehaviour::HangsThenFailsHealth(flag) => {
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            std::future::pending::<()>().await
        }
        Misbehaviour::HangsAfterHeaders => {
            let _ = tcp
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
                )
                .await;
            let _ = tcp.flush().await;
            std::future::pending::<()>().await
        }
        Misbehaviour::FailsUntil(healed) if healed.load(std::sync::atomic::Ordering::SeqCst) => {
            let body = r#"{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}"#;
            let _ = tcp
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        }
        Misbehaviour::Fails | Misbehaviour::FailsUntil(_) => {
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
    // Silent from the start, or silent after a 200 stream's headers: the
    // bound is on the stream's first data either way.
    for how in [Misbehaviour::Hangs, Misbehaviour::HangsAfterHeaders] {
        let (u, _bad) = with_bad(
            how,
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
            1.0,
            "{how:?}"
        );
        let retries = u.ingress_metric("tether_ingress_retries", "").await?;
        for i in 0..10 {
            let r = u.chat(Some(&format!("after-{i}")), "hi", 2).await?;
            assert_eq!(engine_of(&r), "sim-0", "{how:?}");
        }
        assert_eq!(
            u.ingress_metric("tether_ingress_retries", "").await?,
            retries,
            "{how:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_engine_is_found_for_calls_that_do_not_stream() -> anyhow::Result<()> {
    // A call that does not stream waits for its whole answer (here up to
    // 300 s). The engine answers /health and its token counters stand
    // still: the stall watchdog, not the call's timeout, finds it, and the
    // waiting call is retried elsewhere.
    let (u, _bad) = with_bad(
        Misbehaviour::Hangs,
        &[
            "--engine-stall-secs",
            "0.4",
            "--engine-timeout-secs",
            "300",
            "--breaker-failures",
            "0",
        ],
    )
    .await?;
    until_retried(&u, false).await?;
    assert!(
        u.ingress_metric("tether_ingress_engine_stalls", "engine=\"bad\"")
            .await?
            >= 1.0
    );
    assert!(
        u.ingress_metric("tether_ingress_retries", "reason=\"unhealthy\"")
            .await?
            >= 1.0
    );
    assert_eq!(
        u.ingress_metric("tether_ingress_retries", "reason=\"timeout\"")
            .await?,
        0.0
    );
    assert_eq!(
        u.ingress_metric("tether_ingress_engine_stalls", "engine=\"sim-0\"")
            .await?,
        0.0,
        "a working engine is never marked"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_answer_is_not_a_stall() -> anyhow::Result<()> {
    // One engine-sim, a stall bound of 0.3 s, and a call that does not
    // stream and takes several bounds to generate: nothing comes back
    // until it is done, but the engine's token counters move, so it is
    // never marked (a mark would fail the call: there is no other engine).
    let u = start(Options {
        engines: 1,
        ingress_args: ["--engine-stall-secs", "0.3"]
            .iter()
            .map(|s| (*s).to_owned())
            .collect(),
        ..Options::default()
    })
    .await;
    let r = u
        .chat(Some("long-answer"), "tell me everything", 150)
        .await?;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["usage"]["completion_tokens"], 150, "{}", r.text());
    assert_eq!(
        u.ingress_metric("tether_ingress_engine_stalls", "").await?,
        0.0
    );
    assert_eq!(u.ingress_metric("tether_ingress_retries", "").await?, 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_waiting_on_an_engine_that_turns_unhealthy_is_retried() -> anyhow::Result<()> {
    // The engine takes the call, then fails its health probes: the call is
    // retried at once, not after its timeout (stall watchdog off).
    static DOWN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let (u, _bad) = with_bad(
        Misbehaviour::HangsThenFailsHealth(&DOWN),
        &[
            "--engine-stall-secs",
            "0",
            "--engine-timeout-secs",
            "300",
            "--health-interval-ms",
            "100",
            "--breaker-failures",
            "0",
        ],
    )
    .await?;
    until_retried(&u, false).await?;
    assert!(DOWN.load(std::sync::atomic::Ordering::SeqCst));
    assert!(
        u.ingress_metric("tether_ingress_retries", "reason=\"unhealthy\"")
            .await?
            >= 1.0
    );
    assert_eq!(
        u.ingress_metric("tether_ingress_engine_stalls", "").await?,
        0.0
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
        // 3 s: long enough that the holder below, whose headers come at
        // once, is never cut off by it on a loaded machine.
        ingress_args: [
            "--header-read-timeout-secs",
            "3",
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

/// A nats-server running deploy/nats/tether.conf (with generated passwords
/// and its own store directory), stopped when dropped.
struct SecuredNats {
    port: u16,
    child: std::process::Child,
    dir: std::path::PathBuf,
    ingress: String,
    scheduler: String,
    session_state: String,
    kv_events: String,
}

impl SecuredNats {
    fn start() -> anyhow::Result<Self> {
        use tether_universe::tether_testkit::{free_port, workspace_root};
        let root = workspace_root();
        let conf = std::fs::read_to_string(root.join("deploy/nats/tether.conf"))?;
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("tether-secured-nats-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let conf = conf.replace(
            "store_dir: \"/data/jetstream\"",
            &format!("store_dir: {:?}", dir.join("js").display().to_string()),
        );
        anyhow::ensure!(
            conf.contains(&dir.display().to_string()),
            "store_dir not found"
        );
        let conf_path = dir.join("tether.conf");
        std::fs::write(&conf_path, conf)?;
        let password = || format!("{:016x}", tether_protocol::random_u64());
        let (ingress, scheduler, session_state, kv_events) =
            (password(), password(), password(), password());
        let bin = std::env::var_os("TETHER_NATS_SERVER")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                let local = root.join(".tools/venv/bin/nats-server");
                if local.exists() {
                    local
                } else {
                    "nats-server".into()
                }
            });
        let child = std::process::Command::new(bin)
            .arg("-c")
            .arg(&conf_path)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .env("INGRESS_PASSWORD", &ingress)
            .env("SCHEDULER_PASSWORD", &scheduler)
            .env("SESSION_STATE_PASSWORD", &session_state)
            .env("KV_EVENTS_PASSWORD", &kv_events)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let s = Self {
            port,
            child,
            dir,
            ingress,
            scheduler,
            session_state,
            kv_events,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(s)
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn client(&self, user: &str, password: &str) -> anyhow::Result<tether_bus::Bus> {
        let (client, stats) = tether_bus::connect_with(
            &tether_bus::BusConfig {
                url: self.url(),
                name: format!("test-{user}"),
            },
            &tether_bus::BusAuth {
                user: Some(user.into()),
                password: Some(password.into()),
                ..tether_bus::BusAuth::default()
            },
        )
        .await?;
        let bus = tether_bus::Bus::new(client, tether_protocol::Subjects::default(), stats);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !bus.is_connected() {
            anyhow::ensure!(Instant::now() < deadline, "{user} never connected");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(bus)
    }
}

impl Drop for SecuredNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A request `bus` may send (`subject`), answered by the server or by its
/// "no responders" status: when it returns, the server has processed all
/// this connection sent before (`flush` only writes the socket).
async fn round_trip(bus: &tether_bus::Bus, subject: &'static str) -> anyhow::Result<()> {
    tokio::time::timeout(
        Duration::from_secs(5),
        bus.client.request(subject, bytes::Bytes::new()),
    )
    .await
    .map_err(|_| anyhow::anyhow!("no round trip on {subject}"))?
    .map(|_| ())
    .or_else(|e| match e.kind() {
        tether_bus::async_nats::client::RequestErrorKind::NoResponders => Ok(()),
        _ => Err(anyhow::anyhow!("round trip on {subject}: {e}")),
    })
}

/// The next message on `sub` (10 s at most).
async fn next_payload(sub: &mut tether_bus::Subscriber) -> anyhow::Result<bytes::Bytes> {
    let msg = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("subscription ended"))?;
    Ok(msg.payload)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shipped_nats_config_lets_only_each_service_do_its_part() -> anyhow::Result<()> {
    let nats = SecuredNats::start()?;
    // No credentials, or a wrong password: refused.
    assert!(
        tether_bus::async_nats::connect(nats.url()).await.is_err(),
        "an anonymous client got in"
    );
    assert!(
        tether_bus::async_nats::ConnectOptions::with_user_and_password(
            "ingress".into(),
            "wrong".into()
        )
        .connect(nats.url())
        .await
        .is_err()
    );
    // Credentials in the URL work (the deployment's way).
    let in_url = tether_bus::BusArgs {
        nats_url: format!("nats://ingress:{}@127.0.0.1:{}", nats.ingress, nats.port),
        prefix: "tether".into(),
        shards: 4,
        nats_user: None,
        nats_password: None,
        nats_token: None,
        nats_nkey_file: None,
        nats_creds: None,
        nats_tls_ca: None,
        nats_tls_cert: None,
        nats_tls_key: None,
        nats_tls: false,
    }
    .connect("test-url")
    .await?;
    let ingress = nats.client("ingress", &nats.ingress).await?;
    let scheduler = nats.client("scheduler", &nats.scheduler).await?;
    let state = nats.client("session-state", &nats.session_state).await?;
    let kv = nats.client("kv-events", &nats.kv_events).await?;

    // A round trip each user may make.
    const INGRESS: &str = "tether.session.9999";
    const SCHEDULER: &str = "tether.snapshot.9999";
    const STATE: &str = "$JS.API.INFO";

    // Events: only the ingress's reach a subscriber.
    let mut events = state.subscribe("tether.events.>".into()).await?;
    round_trip(&state, STATE).await?;
    for (forger, sync) in [(&scheduler, SCHEDULER), (&state, STATE)] {
        forger
            .client
            .publish("tether.events.0", "forged".into())
            .await?;
        round_trip(forger, sync).await?;
    }
    in_url
        .client
        .publish("tether.events.0", "real".into())
        .await?;
    assert_eq!(next_payload(&mut events).await?, "real");

    // State deltas: only session-state's.
    let mut deltas = scheduler.subscribe("tether.state.>".into()).await?;
    round_trip(&scheduler, SCHEDULER).await?;
    for (forger, sync) in [(&ingress, INGRESS), (&scheduler, SCHEDULER)] {
        forger
            .client
            .publish("tether.state.0", "forged".into())
            .await?;
        round_trip(forger, sync).await?;
    }
    state
        .client
        .publish("tether.state.0", "real".into())
        .await?;
    assert_eq!(next_payload(&mut deltas).await?, "real");

    // KV cache events: only the relay's.
    let mut kv_events = scheduler.subscribe("tether.kv.>".into()).await?;
    round_trip(&scheduler, SCHEDULER).await?;
    for (forger, sync) in [(&ingress, INGRESS), (&state, STATE)] {
        forger
            .client
            .publish("tether.kv.sim-0", "forged".into())
            .await?;
        round_trip(forger, sync).await?;
    }
    kv.client.publish("tether.kv.sim-0", "real".into()).await?;
    assert_eq!(next_payload(&mut kv_events).await?, "real");
    // Nor may the relay publish anything else.
    let mut all_events = state.subscribe("tether.events.>".into()).await?;
    round_trip(&state, STATE).await?;
    kv.client
        .publish("tether.events.0", "forged".into())
        .await?;
    // The scheduler subscribes to tether.kv.>, so a request there finds a
    // responder that never answers: the relay's connection is synced by
    // one more event of its own instead.
    kv.client.publish("tether.kv.sync", "sync".into()).await?;
    assert_eq!(next_payload(&mut kv_events).await?, "sync");
    in_url
        .client
        .publish("tether.events.0", "after".into())
        .await?;
    assert_eq!(next_payload(&mut all_events).await?, "after");

    // Route requests: nobody but the scheduler, in its queue group, can
    // take them; the ingress's requests find no responder meanwhile.
    let _plain = scheduler.subscribe("tether.route".into()).await?;
    let _other_group = scheduler
        .queue_subscribe("tether.route".into(), "intruders")
        .await?;
    let _as_state = state
        .queue_subscribe("tether.route".into(), "tether-scheduler")
        .await?;
    let _as_ingress = ingress
        .queue_subscribe("tether.route".into(), "tether-scheduler")
        .await?;
    round_trip(&scheduler, SCHEDULER).await?;
    round_trip(&state, STATE).await?;
    round_trip(&ingress, INGRESS).await?;
    let ask = || async {
        tokio::time::timeout(
            Duration::from_secs(5),
            ingress.client.request("tether.route", "route?".into()),
        )
        .await
    };
    match ask().await {
        Ok(Err(e)) => assert_eq!(
            e.kind(),
            tether_bus::async_nats::client::RequestErrorKind::NoResponders,
            "{e}"
        ),
        other => panic!("a route request was taken by an intruder: {other:?}"),
    }
    // The scheduler in its group answers.
    let mut group = scheduler
        .queue_subscribe("tether.route".into(), "tether-scheduler")
        .await?;
    round_trip(&scheduler, SCHEDULER).await?;
    let responder = scheduler.clone();
    let answering = tokio::spawn(async move {
        while let Some(msg) = group.next().await {
            if let Some(reply) = msg.reply {
                let _ = responder.client.publish(reply, "decision".into()).await;
            }
        }
    });
    let answer = ask().await??;
    assert_eq!(answer.payload, "decision");
    // Only the ingress may ask.
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        state.client.request("tether.route", "route?".into()),
    )
    .await;
    assert!(
        !matches!(r, Ok(Ok(_))),
        "session-state could request a route"
    );
    answering.abort();

    // The violations were reported to the offenders.
    let deadline = Instant::now() + Duration::from_secs(10);
    while scheduler.stats.errors.get() == 0 || state.stats.errors.get() == 0 {
        anyhow::ensure!(Instant::now() < deadline, "permission errors not reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

fn parse<T: clap::Parser>(args: &[String]) -> anyhow::Result<T> {
    Ok(T::try_parse_from(args)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_work_under_the_shipped_config_and_are_unready_without_the_bus()
-> anyhow::Result<()> {
    let nats = SecuredNats::start()?;
    let stop = tether_telemetry::Shutdown::new();
    let _stop_all = stop.clone().drop_guard();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let sim_addr = listener.local_addr()?;
    let sim_stop = stop.child_token();
    tokio::spawn(tether_engine_sim::serve(
        listener,
        tether_engine_sim::SimConfig::named("sim-0"),
        async move { sim_stop.cancelled().await },
    ));
    let fleet = nats.dir.join("fleet.toml");
    std::fs::write(
        &fleet,
        format!(
            "[[engines]]\nname = \"sim-0\"\nurl = \"http://{sim_addr}\"\nmodels = [\"{MODEL}\"]\nkind = \"vllm\"\n"
        ),
    )?;
    let fleet = fleet.display().to_string();
    let url = nats.url();
    let common = ["x", "--nats-url", &url, "--shards", "4"];
    let with = |extra: &[&str]| -> Vec<String> {
        common
            .iter()
            .chain(extra)
            .map(|s| (*s).to_owned())
            .collect()
    };

    let state_args = with(&[
        "--nats-user",
        "session-state",
        "--nats-password",
        &nats.session_state,
        "--admin-listen",
        "127.0.0.1:0",
        "--delta-interval-ms",
        "2",
        // Leases too: the shard-lease bucket must be within its permissions.
        "--lease-ttl-ms",
        "3000",
    ]);
    let state = tether_session_state::start(parse(&state_args)?, stop.child_token()).await?;
    let sched_args = with(&[
        "--nats-user",
        "scheduler",
        "--nats-password",
        &nats.scheduler,
        "--admin-listen",
        "127.0.0.1:0",
        "--fleet",
        &fleet,
    ]);
    let scheduler = tether_scheduler::start(parse(&sched_args)?, stop.child_token()).await?;
    let ingress_args = |password: &str| {
        with(&[
            "--nats-user",
            "ingress",
            "--nats-password",
            password,
            "--listen",
            "127.0.0.1:0",
            "--fleet",
            &fleet,
            "--health-interval-ms",
            "50",
        ])
    };
    let good =
        tether_ingress::start(parse(&ingress_args(&nats.ingress))?, stop.child_token()).await?;
    let bad = tether_ingress::start(parse(&ingress_args("wrong"))?, stop.child_token()).await?;

    let client = http::client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = http::get(&client, &format!("http://{}/ready", good.addr)).await?;
        if ready.status == 200 && scheduler.admin.is_ready() && state.admin.is_ready() {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "never ready: ingress {}, scheduler {}, session-state {}",
            ready.status,
            scheduler.admin.is_ready(),
            state.admin.is_ready()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The ingress that cannot authenticate is not ready (its engine is healthy).
    let r = http::get(&client, &format!("http://{}/ready", bad.addr)).await?;
    assert_eq!(r.status, 503);
    // Calls through the good one are routed by the scheduler.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http::post_json(
            &client,
            &format!("http://{}/v1/chat/completions", good.addr),
            &[("x-session-id", "secured")],
            &chat_body("hello", false),
        )
        .await?;
        assert_eq!(r.status, 200, "{}", r.text());
        if r.header("x-tether-route") != Some("fallback") {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the scheduler never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the session view reaches session-state.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = http::get(
            &client,
            &format!("http://{}/v1/tether/sessions/secured", good.addr),
        )
        .await?;
        if r.status == 200 && r.json()["affinity"] == "sim-0" {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "session view: {} {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_route_requests_are_decode_errors_not_no_engine() -> anyhow::Result<()> {
    let u = start(Options {
        engines: 1,
        ..Options::default()
    })
    .await;
    let raw = tether_bus::connect(&tether_bus::BusConfig {
        url: u.nats.url(),
        name: "garbage".into(),
    })
    .await?
    .0;
    for _ in 0..5 {
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            raw.request("tether.route", bytes::Bytes::from_static(b"\xff garbage")),
        )
        .await??;
        assert!(!reply.payload.is_empty(), "no answer to a garbage request");
    }
    let admin = u
        .scheduler
        .as_ref()
        .map(|s| s.admin_addr)
        .ok_or_else(|| anyhow::anyhow!("no scheduler"))?;
    let text = http::get(&u.http, &format!("http://{admin}/metrics"))
        .await?
        .text();
    assert_eq!(
        tether_universe::metric_sum(&text, "tether_bus_decode_errors", "kind=\"route\""),
        5.0
    );
    assert_eq!(
        tether_universe::metric_sum(&text, "tether_scheduler_no_engine", ""),
        0.0
    );
    Ok(())
}

fn sha256_hex(s: &str) -> String {
    tether_protocol::key::sha256_hex(s.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_tenants_and_keyed_implicit_sessions() -> anyhow::Result<()> {
    let keys = format!(
        "acme:{},globex:{}",
        sha256_hex("key-a"),
        sha256_hex("key-g")
    );
    let u = start(Options {
        engines: 1,
        ingress_args: vec![
            "--api-keys".into(),
            keys,
            "--session-key-salt".into(),
            "pepper".into(),
        ],
        ..Options::default()
    })
    .await;
    let url = u.url("/v1/chat/completions");
    let body = chat_body("a guessable opening", false);
    // No key, or a wrong one: 401, counted.
    for auth in [None, Some("Bearer nope"), Some("Bearer ")] {
        let headers: Vec<(&str, &str)> =
            auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
        let r = http::post_json(&u.http, &url, &headers, &body).await?;
        assert_eq!(r.status, 401, "{auth:?}");
        assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    }
    assert_eq!(http::get(&u.http, &u.url("/v1/models")).await?.status, 401);
    // acme's calls: an explicit session and an implicit one.
    let acme = [
        ("authorization", "Bearer key-a"),
        ("x-session-id", "shared-name"),
    ];
    let r = http::post_json(&u.http, &url, &acme, &body).await?;
    engine_of(&r);
    let r = http::post_json(&u.http, &url, &[("authorization", "Bearer key-a")], &body).await?;
    engine_of(&r);
    let implicit = r.header("x-tether-session").unwrap_or_default().to_owned();
    assert!(implicit.starts_with("implicit-"), "{implicit}");
    // The implicit key is keyed: not the one anybody can compute.
    let guessed = tether_protocol::SessionKey::implicit(MODEL, "", "a guessable opening");
    assert_ne!(implicit, guessed.as_str());

    let view = |key: String, auth: Option<&'static str>| {
        let u = &u;
        async move {
            let headers: Vec<(&str, &str)> =
                auth.map(|a| vec![("authorization", a)]).unwrap_or_default();
            http::fetch(
                &u.http,
                http::Method::GET,
                &u.url(&format!("/v1/tether/sessions/{key}")),
                &headers,
                bytes::Bytes::new(),
            )
            .await
        }
    };
    // acme sees its sessions (once session-state has them).
    for key in ["shared-name".to_owned(), implicit.clone()] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = view(key.clone(), Some("Bearer key-a")).await?;
            if r.status == 200 {
                assert_eq!(r.json()["session"], key.as_str());
                break;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{key}: {} {}",
                r.status,
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Nobody else does: no key, another tenant's key, or the guessed implicit key.
    assert_eq!(view("shared-name".into(), None).await?.status, 401);
    assert_eq!(
        view("shared-name".into(), Some("Bearer key-g"))
            .await?
            .status,
        404
    );
    assert_eq!(
        view(implicit.clone(), Some("Bearer key-g")).await?.status,
        404
    );
    assert_eq!(
        view(guessed.as_str().to_owned(), Some("Bearer key-a"))
            .await?
            .status,
        404
    );
    // The tenant is in the metrics.
    assert_eq!(
        u.ingress_metric("tether_ingress_calls", "tenant=\"acme\"")
            .await?,
        2.0
    );
    Ok(())
}

/// Runs openssl (a test dependency, like nats-server) with `args` in `dir`.
fn openssl(dir: &std::path::Path, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, in `dir`.
fn certificates(dir: &std::path::Path) -> anyhow::Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "1",
        "-subj",
        "/CN=tether-test-ca",
    ]);
    openssl(dir, &ca)?;
    for (name, ext) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "client",
            "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
        ),
    ] {
        std::fs::write(dir.join(format!("{name}.ext")), ext)?;
        let (key, csr, pem, extfile, subj) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
            format!("/CN=tether-test-{name}"),
        );
        let mut req = vec!["req"];
        req.extend(ec);
        req.extend(["-keyout", &key, "-out", &csr, "-subj", &subj]);
        openssl(dir, &req)?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "1",
                "-extfile",
                &extfile,
            ],
        )?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_reach_nats_over_tls_with_a_token_and_a_client_certificate() -> anyhow::Result<()>
{
    use tether_universe::tether_testkit::{free_port, workspace_root};
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("tether-tls-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    struct Cleanup(std::path::PathBuf, Option<std::process::Child>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(c) = &mut self.1 {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let mut cleanup = Cleanup(dir.clone(), None);
    certificates(&dir)?;
    let bin = std::env::var_os("TETHER_NATS_SERVER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".tools/venv/bin/nats-server"));
    let p = |f: &str| dir.join(f).display().to_string();
    cleanup.1 = Some(
        std::process::Command::new(bin)
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "--auth",
                "s3cret-token",
            ])
            .args([
                "--tlsverify",
                "--tlscert",
                &p("server.pem"),
                "--tlskey",
                &p("server.key"),
            ])
            .args(["--tlscacert", &p("ca.pem")])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let args = |extra: &[String]| -> anyhow::Result<tether_bus::BusArgs> {
        #[derive(clap::Parser)]
        struct Flags {
            #[command(flatten)]
            bus: tether_bus::BusArgs,
        }
        let mut v = vec!["x".to_owned()];
        v.extend(extra.iter().cloned());
        Ok(<Flags as clap::Parser>::try_parse_from(v)?.bus)
    };
    // Token in the URL, tls:// scheme, the CA and a client certificate.
    let bus = args(&[
        "--nats-url".into(),
        format!("tls://s3cret-token@127.0.0.1:{port}"),
        "--nats-tls-ca".into(),
        p("ca.pem"),
        "--nats-tls-cert".into(),
        p("client.pem"),
        "--nats-tls-key".into(),
        p("client.key"),
    ])?
    .connect("tls-test")
    .await?;
    // The token as a flag, TLS implied by the CA.
    let bus2 = args(&[
        "--nats-url".into(),
        format!("nats://127.0.0.1:{port}"),
        "--nats-token".into(),
        "s3cret-token".into(),
        "--nats-tls-ca".into(),
        p("ca.pem"),
        "--nats-tls-cert".into(),
        p("client.pem"),
        "--nats-tls-key".into(),
        p("client.key"),
    ])?
    .connect("tls-test-2")
    .await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(bus.is_connected() && bus2.is_connected()) {
        anyhow::ensure!(Instant::now() < deadline, "never connected over TLS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sub = bus.subscribe("tether.tls".into()).await?;
    round_trip_any(&bus).await;
    bus2.client.publish("tether.tls", "over tls".into()).await?;
    assert_eq!(next_payload(&mut sub).await?, "over tls");
    // Without the client certificate, or without the token: refused.
    let url = format!("tls://127.0.0.1:{port}");
    let no_cert = tether_bus::async_nats::ConnectOptions::with_token("s3cret-token".into())
        .add_root_certificates(dir.join("ca.pem"))
        .connect(url.as_str())
        .await;
    assert!(no_cert.is_err(), "connected without a client certificate");
    let no_token = tether_bus::async_nats::ConnectOptions::new()
        .add_root_certificates(dir.join("ca.pem"))
        .add_client_certificate(dir.join("client.pem"), dir.join("client.key"))
        .connect(url.as_str())
        .await;
    assert!(no_token.is_err(), "connected without the token");
    Ok(())
}

/// A request nobody answers: when "no responders" comes back, the server
/// has processed what this connection sent before.
async fn round_trip_any(bus: &tether_bus::Bus) {
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        bus.client.request("tether.nobody", bytes::Bytes::new()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejected_engine_is_readmitted_after_a_good_probe() -> anyhow::Result<()> {
    static HEALED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let (u, _bad) = with_bad(
        Misbehaviour::FailsUntil(&HEALED),
        &["--breaker-failures", "1", "--breaker-cooldown-ms", "300"],
    )
    .await?;
    until_retried(&u, false).await?;
    assert_eq!(
        u.ingress_metric("tether_ingress_engine_ejections", "engine=\"bad\"")
            .await?,
        1.0
    );
    HEALED.store(true, std::sync::atomic::Ordering::SeqCst);
    // After the cool-down calls probe it again; it answers, and is back.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut i = 0;
    loop {
        i += 1;
        let r = u.chat(Some(&format!("probe-{i}")), "hi", 2).await?;
        if engine_of(&r) == "bad" {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the engine was never probed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while u
        .ingress_metric("tether_ingress_engine_ejected", "engine=\"bad\"")
        .await?
        != 0.0
    {
        anyhow::ensure!(Instant::now() < deadline, "still ejected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_reach_nats_with_an_nkey() -> anyhow::Result<()> {
    use tether_universe::tether_testkit::{free_port, workspace_root};
    let user = nkeys::KeyPair::new_user();
    let port = free_port()?;
    let dir = std::env::temp_dir().join(format!("tether-nkey-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    struct Cleanup(std::path::PathBuf, Option<std::process::Child>);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            if let Some(c) = &mut self.1 {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let mut cleanup = Cleanup(dir.clone(), None);
    let conf = dir.join("nkey.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users: [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    )?;
    let seed = dir.join("user.nk");
    std::fs::write(&seed, format!("{}\n", user.seed()?))?;
    let bin = std::env::var_os("TETHER_NATS_SERVER")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join(".tools/venv/bin/nats-server"));
    cleanup.1 = Some(
        std::process::Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    #[derive(clap::Parser)]
    struct Flags {
        #[command(flatten)]
        bus: tether_bus::BusArgs,
    }
    let url = format!("nats://127.0.0.1:{port}");
    let flags = <Flags as clap::Parser>::try_parse_from([
        "x",
        "--nats-url",
        &url,
        "--nats-nkey-file",
        &seed.display().to_string(),
    ])?;
    let bus = flags.bus.connect("nkey-test").await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !bus.is_connected() {
        anyhow::ensure!(Instant::now() < deadline, "never connected with the nkey");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another key is refused.
    let other = nkeys::KeyPair::new_user().seed()?;
    let refused = tether_bus::async_nats::ConnectOptions::with_nkey(other)
        .connect(url.as_str())
        .await;
    assert!(refused.is_err(), "a stranger's nkey got in");
    Ok(())
}
