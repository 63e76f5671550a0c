//! KV cache events: engine-sim publishes them as vLLM does (checked by
//! decoding them with Python's `msgspec` and `pyzmq`, vLLM's own encoder
//! library), `tether-kv-events` relays them over NATS, and the scheduler's
//! exact index follows them, an engine restart included.
//!
//! The Python check needs `msgspec` and `pyzmq` in `.tools/venv` (`just
//! tools` installs them) or a Python named by `TETHER_PYTHON` that has them.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;
use tether_engine_sim::tokens::{block_hashes, tokenize};
use tether_engine_sim::{KvEventsFormat, SimConfig};
use tether_telemetry::Shutdown;
use tether_universe::tether_testkit::{self, free_port, http};

/// A child process killed when dropped (a failing test stops it too).
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> std::path::PathBuf {
    std::env::var_os("TETHER_PYTHON").map_or_else(
        || root().join(".tools/venv/bin/python"),
        std::path::PathBuf::from,
    )
}

/// A prompt of `n` distinct words starting at `from`.
fn words(from: usize, n: usize) -> String {
    (from..from + n)
        .map(|i| format!("w{i}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts an engine-sim publishing KV events; returns its URL and the
/// event and replay endpoints.
async fn engine_with_events(
    name: &str,
    blocks: usize,
    format: KvEventsFormat,
    stop: &Shutdown,
) -> anyhow::Result<(String, String, String)> {
    let events = format!("tcp://127.0.0.1:{}", free_port()?);
    let replay = format!("tcp://127.0.0.1:{}", free_port()?);
    engine_at("127.0.0.1:0", &events, &replay, name, blocks, format, stop).await
}

/// Starts an engine-sim on the given HTTP address and event endpoints.
async fn engine_at(
    http_addr: &str,
    events: &str,
    replay: &str,
    name: &str,
    blocks: usize,
    format: KvEventsFormat,
    stop: &Shutdown,
) -> anyhow::Result<(String, String, String)> {
    let (events, replay) = (events.to_owned(), replay.to_owned());
    let listener = tokio::net::TcpListener::bind(http_addr).await?;
    let addr = listener.local_addr()?;
    let mut cfg = SimConfig::named(name);
    cfg.kv_cache_tokens = blocks * cfg.block_size;
    cfg.kv_events_endpoint = Some(events.replace("127.0.0.1", "*"));
    cfg.kv_events_replay_endpoint = Some(replay.clone());
    cfg.kv_events_format = format;
    cfg.time_scale = 50.0;
    let stop = stop.clone();
    tokio::spawn(async move {
        if let Err(e) =
            tether_engine_sim::serve(listener, cfg, async move { stop.cancelled().await }).await
        {
            eprintln!("engine-sim failed: {e}");
        }
    });
    Ok((format!("http://{addr}"), events, replay))
}

async fn complete(client: &http::HttpClient, url: &str, prompt: &str) -> anyhow::Result<()> {
    let body = serde_json::json!({"model": "tether-sim", "prompt": prompt, "max_tokens": 1});
    for _ in 0..200 {
        match http::post_json(client, &format!("{url}/v1/completions"), &[], &body).await {
            Ok(r) if r.status == 200 => return Ok(()),
            Ok(r) => anyhow::bail!("completion failed: {} {}", r.status, r.text()),
            // The engine may still be starting.
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    anyhow::bail!("engine-sim at {url} never answered")
}

async fn decoded_by_msgspec(format: KvEventsFormat) -> anyhow::Result<()> {
    let stop = Shutdown::new();
    let (url, events, replay) = engine_with_events("sim-py", 8, format, &stop).await?;
    let script = root().join("tools/engine-sim/tests/vllm_kv_events.py");
    let fmt = match format {
        KvEventsFormat::Array => "array",
        KvEventsFormat::Map => "map",
    };
    let mut child = Child(
        std::process::Command::new(python())
            .arg(&script)
            .args([&events, &replay, fmt])
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| {
                anyhow::anyhow!("cannot run {} (run `just tools`): {e}", python().display())
            })?,
    );
    let stdout = child
        .0
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    // The script's lines, read off the runtime's threads.
    let (line_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line_tx.send(line).is_err() {
                return;
            }
        }
    });
    let ready = tokio::time::timeout(Duration::from_secs(60), lines.recv()).await?;
    anyhow::ensure!(ready.as_deref() == Some("ready"), "script said {ready:?}");
    // Until the subscription reaches the publisher, batches are lost: send
    // harmless ones (clearing the empty cache) until one arrives.
    let client = http::client();
    let reset_url = format!("{url}/reset_prefix_cache");
    let mut live = false;
    for _ in 0..600 {
        let r = http::post_json(&client, &reset_url, &[], &serde_json::json!({})).await;
        anyhow::ensure!(r.is_ok_and(|r| r.status == 200), "reset failed");
        if let Ok(Some(line)) = tokio::time::timeout(Duration::from_millis(50), lines.recv()).await
        {
            anyhow::ensure!(line == "live", "script said {line:?}");
            live = true;
            break;
        }
    }
    anyhow::ensure!(live, "no batch reached the script");

    // 8 blocks of 16 tokens. A: 64 words = 4 full blocks (its one answer
    // token is sampled, never computed). B: 96 words = 6 blocks: evicts 2.
    let (a, b) = (words(0, 64), words(1000, 96));
    complete(&client, &url, &a).await?;
    complete(&client, &url, &b).await?;
    let reset = http::post_json(
        &client,
        &format!("{url}/reset_prefix_cache"),
        &[],
        &serde_json::json!({}),
    )
    .await?;
    assert_eq!(reset.status, 200, "{}", reset.text());

    let out = tokio::time::timeout(Duration::from_secs(60), lines.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the script printed no result"))?;
    let status = child.0.wait()?;
    stop.cancel();
    anyhow::ensure!(status.success(), "the script failed: {status}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    // The clears of the empty cache sent to get the stream going come first.
    let events: Vec<serde_json::Value> = v["events"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .skip_while(|e| e["kind"] == "cleared")
        .collect();

    let ha = block_hashes(&tokenize(&a), 16);
    let hb = block_hashes(&tokenize(&b), 16);
    let u = |h: &[u64]| serde_json::json!(h);
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(events[0]["kind"], "stored");
    assert_eq!(events[0]["hashes"], u(&ha));
    assert!(events[0]["parent"].is_null());
    assert_eq!(events[0]["tokens"], serde_json::json!(tokenize(&a)));
    assert_eq!(events[0]["block_size"], 16);
    assert_eq!(events[0]["medium"], "GPU");
    // B's admission evicts A's least recently released blocks: its tail.
    assert_eq!(events[1]["kind"], "removed");
    assert_eq!(events[1]["hashes"], u(&[ha[3], ha[2]]));
    assert_eq!(events[2]["kind"], "stored");
    assert_eq!(events[2]["hashes"], u(&hb));
    assert_eq!(events[3]["kind"], "cleared");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_sim_events_decode_with_vllms_msgspec_classes() -> anyhow::Result<()> {
    decoded_by_msgspec(KvEventsFormat::Array).await?;
    decoded_by_msgspec(KvEventsFormat::Map).await
}

/// The scheduler's metric `name` (summed over labels containing `labels`).
fn metric(admin: &tether_telemetry::AdminState, name: &str, labels: &str) -> f64 {
    tether_universe::metric_sum(&admin.render_metrics(), name, labels)
}

/// Waits (bounded) until `cond` holds.
async fn until(what: &str, mut cond: impl FnMut() -> bool) -> anyhow::Result<()> {
    for _ in 0..1500 {
        if cond() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    anyhow::bail!("timed out waiting until {what}")
}

async fn route(
    bus: &tether_bus::Bus,
    call_id: u64,
    blocks: &[u64],
) -> anyhow::Result<tether_protocol::RouteDecision> {
    let req = tether_protocol::RouteRequest {
        call_id,
        session_hash: call_id,
        model: "tether-sim".into(),
        prompt_tokens: 128,
        block_hashes: blocks.to_vec(),
        candidates: vec![],
        program: false,
    };
    match bus
        .request::<_, tether_protocol::RouteReply>(
            bus.subjects.route(),
            &req,
            Duration::from_secs(5),
        )
        .await?
    {
        tether_protocol::RouteReply::Decision(d) => Ok(d),
        other => anyhow::bail!("no decision: {other:?}"),
    }
}

/// engine-sim → ZMQ → tether-kv-events → NATS → the scheduler's exact index
/// → placement: a prompt cached on an engine is routed there; after the
/// engine drops its cache (`AllBlocksCleared`) or restarts, no call is routed
/// on the stale entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_follows_the_engines_events_through_clears_and_restarts() -> anyhow::Result<()> {
    use tether_fleet::{EngineConfig, EngineKind, FleetConfig};
    use tether_protocol::RouteReason;
    let nats = tether_testkit::NatsServer::start()?;
    let root = Shutdown::new();
    let stop_a = root.child_token();
    let stop_b = root.child_token();
    let (url_a, ev_a, rp_a) =
        engine_with_events("sim-a", 64, KvEventsFormat::Array, &stop_a).await?;
    let (url_b, ev_b, rp_b) = engine_with_events("sim-b", 64, KvEventsFormat::Map, &stop_b).await?;
    let engine = |name: &str, url: &str, ev: &str, rp: &str| EngineConfig {
        name: name.into(),
        url: url.into(),
        models: vec!["tether-sim".into()],
        kind: EngineKind::Vllm,
        priority: false,
        max_concurrency: 256,
        cache_tokens: 1024,
        kv_events: Some(ev.into()),
        kv_replay: Some(rp.into()),
    };
    let fleet = std::sync::Arc::new(FleetConfig {
        engines: vec![
            engine("sim-a", &url_a, &ev_a, &rp_a),
            engine("sim-b", &url_b, &ev_b, &rp_b),
        ],
    });
    let nats_url = nats.url();
    let base = [
        "x",
        "--nats-url",
        &nats_url,
        "--admin-listen",
        "127.0.0.1:0",
        "--shards",
        "1",
    ];
    let relay = tether_kv_events::start_with_fleet(
        <tether_kv_events::Config as clap::Parser>::try_parse_from(base)?,
        fleet.clone(),
        root.child_token(),
    )
    .await?;
    let mut sched_args = base.to_vec();
    sched_args.extend(["--prefix-source", "exact", "--strategy", "cache-aware"]);
    let sched = tether_scheduler::start_with_fleet(
        <tether_scheduler::Config as clap::Parser>::try_parse_from(sched_args)?,
        fleet.clone(),
        root.child_token(),
    )
    .await?;
    let bus = tether_bus::Bus::connect(
        &tether_bus::BusConfig {
            url: nats_url.clone(),
            name: "test".into(),
        },
        tether_protocol::Subjects::default(),
    )
    .await?;
    until("the relay follows both engines", || relay.admin.is_ready()).await?;
    assert_eq!(
        metric(
            &sched.admin,
            "tether_scheduler_prefix_source",
            "source=\"exact\""
        ),
        1.0
    );

    // 128 words: 8 blocks, cached on sim-a only.
    let client = http::client();
    let prompt = words(0, 128);
    let blocks = block_hashes(&tokenize(&prompt), 16);
    complete(&client, &url_a, &prompt).await?;
    until("the index holds sim-a's blocks", || {
        metric(&sched.admin, "tether_scheduler_kv_index_blocks", "") >= 8.0
    })
    .await?;
    let d = route(&bus, 1, &blocks).await?;
    assert_eq!(
        (d.engine.as_str(), d.reason),
        ("sim-a", RouteReason::PrefixMatch)
    );

    // A new replica starts from the relay's snapshot, not from empty: it
    // knows sim-a's blocks though no event has come since it started.
    let mut args2 = base.to_vec();
    args2.extend(["--prefix-source", "exact"]);
    let stop2 = root.child_token();
    let sched2 = tether_scheduler::start_with_fleet(
        <tether_scheduler::Config as clap::Parser>::try_parse_from(args2)?,
        fleet.clone(),
        stop2.clone(),
    )
    .await?;
    until("the new replica loads sim-a's snapshot", || {
        metric(
            &sched2.admin,
            "tether_scheduler_kv_snapshots_total",
            "outcome=\"loaded\"",
        ) >= 2.0
            && metric(&sched2.admin, "tether_scheduler_kv_index_blocks", "") >= 8.0
    })
    .await?;
    stop2.cancel();
    tokio::time::timeout(Duration::from_secs(10), sched2.join()).await?;

    // sim-a drops its cache: the index follows, and nothing goes there for it.
    let reset = http::post_json(
        &client,
        &format!("{url_a}/reset_prefix_cache"),
        &[],
        &serde_json::json!({}),
    )
    .await?;
    assert_eq!(reset.status, 200, "{}", reset.text());
    until("the index forgets sim-a's blocks", || {
        metric(&sched.admin, "tether_scheduler_kv_index_blocks", "") == 0.0
    })
    .await?;
    let d = route(&bus, 2, &blocks).await?;
    assert_ne!(
        d.reason,
        RouteReason::PrefixMatch,
        "routed on a cleared cache: {d:?}"
    );

    // Now cached on sim-b, which then restarts (same address, empty cache).
    complete(&client, &url_b, &prompt).await?;
    until("the index holds sim-b's blocks", || {
        metric(
            &sched.admin,
            "tether_scheduler_kv_batches_total",
            "outcome=\"ok\"",
        ) >= 3.0
            && metric(&sched.admin, "tether_scheduler_kv_index_blocks", "") >= 8.0
    })
    .await?;
    let d = route(&bus, 3, &blocks).await?;
    assert_eq!(
        (d.engine.as_str(), d.reason),
        ("sim-b", RouteReason::PrefixMatch)
    );
    stop_b.cancel();
    until("the relay sees sim-b go", || !relay.admin.is_ready()).await?;
    let stop_b2 = root.child_token();
    let http_b = url_b.trim_start_matches("http://").to_owned();
    let mut restarted = false;
    for _ in 0..200 {
        // The old sockets may take a moment to release their ports.
        if engine_at(
            &http_b,
            &ev_b.replace("127.0.0.1", "*"),
            &rp_b,
            "sim-b",
            64,
            KvEventsFormat::Map,
            &stop_b2,
        )
        .await
        .is_ok()
        {
            restarted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::ensure!(restarted, "sim-b did not restart");
    until("the index forgets the restarted sim-b's blocks", || {
        metric(&sched.admin, "tether_scheduler_kv_index_blocks", "") == 0.0
    })
    .await?;
    assert!(
        metric(
            &relay.admin,
            "tether_kv_events_resets_total",
            "reason=\"disconnect\""
        ) >= 1.0
    );
    let d = route(&bus, 4, &blocks).await?;
    assert_ne!(
        d.reason,
        RouteReason::PrefixMatch,
        "routed on a restarted engine's old cache: {d:?}"
    );
    root.cancel();
    Ok(())
}

/// What an engine-sim holds now (its `/kv_cache/blocks`).
async fn engine_blocks(
    client: &http::HttpClient,
    url: &str,
) -> anyhow::Result<std::collections::HashSet<u64>> {
    let r = http::get(client, &format!("{url}/kv_cache/blocks")).await?;
    Ok(r.json()["blocks"]
        .as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default())
}

/// The share of `prompts` whose leading run of cached blocks the index
/// gives exactly as the engine holds it.
fn agreement(
    index: &tether_scheduler::kv_index::KvIndex,
    held: &std::collections::HashSet<u64>,
    prompts: &[Vec<u64>],
) -> f64 {
    let same = prompts
        .iter()
        .filter(|p| {
            let engine = p.iter().take_while(|h| held.contains(h)).count();
            let index = p.iter().take_while(|h| index.holds(0, **h)).count();
            engine == index
        })
        .count();
    same as f64 / prompts.len().max(1) as f64
}

/// The exact index, fed through the relay and NATS, agrees with what the
/// engine holds: under a workload that evicts most blocks, on every lookup
/// once the events are in (and, measured and printed, while they flow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exact_index_agrees_with_the_engines_cache() -> anyhow::Result<()> {
    use futures::StreamExt;
    use std::sync::{Arc, Mutex};
    use tether_fleet::{EngineConfig, EngineKind, FleetConfig};
    use tether_scheduler::kv_index::KvIndex;
    let nats = tether_testkit::NatsServer::start()?;
    let root = Shutdown::new();
    let (url, ev, rp) = engine_with_events("sim-x", 48, KvEventsFormat::Array, &root).await?;
    let fleet = Arc::new(FleetConfig {
        engines: vec![EngineConfig {
            name: "sim-x".into(),
            url: url.clone(),
            models: vec!["tether-sim".into()],
            kind: EngineKind::Vllm,
            priority: false,
            max_concurrency: 256,
            cache_tokens: 768,
            kv_events: Some(ev),
            kv_replay: Some(rp),
        }],
    });
    let nats_url = nats.url();
    let bus = tether_bus::Bus::connect(
        &tether_bus::BusConfig {
            url: nats_url.clone(),
            name: "test".into(),
        },
        tether_protocol::Subjects::default(),
    )
    .await?;
    let mut sub = bus.subscribe(bus.subjects.kv_all()).await?;
    let index = Arc::new(Mutex::new(KvIndex::new(1, 1_000_000, 2000)));
    let feed = index.clone();
    let applier = tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            if let Ok(b) = tether_protocol::decode::<tether_protocol::KvEventBatch>(&msg.payload)
                && let Ok(mut ix) = feed.lock()
            {
                ix.apply(0, &b);
            }
        }
    });
    // Cached before the relay listens: it must learn it by replay.
    let client = http::client();
    let early = words(7_000_000, 64);
    complete(&client, &url, &early).await?;
    let relay = tether_kv_events::start_with_fleet(
        <tether_kv_events::Config as clap::Parser>::try_parse_from([
            "x",
            "--nats-url",
            &nats_url,
            "--admin-listen",
            "127.0.0.1:0",
        ])?,
        fleet,
        root.child_token(),
    )
    .await?;
    until("the relay follows the engine", || relay.admin.is_ready()).await?;
    // A batch reaching the relay (the first may be sent before its
    // subscription reaches the engine) makes it replay from 0.
    let early_h = block_hashes(&tokenize(&early), 16);
    let mut replayed = false;
    for k in 0..100 {
        complete(&client, &url, &words(8_000_000 + k * 1000, 16)).await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let ix = index.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        if early_h.iter().all(|h| ix.holds(0, *h)) {
            replayed = true;
            break;
        }
    }
    assert!(
        replayed,
        "blocks cached before the relay started were not replayed"
    );
    assert!(
        metric(
            &relay.admin,
            "tether_kv_events_replays_total",
            "outcome=\"ok\""
        ) >= 1.0
    );
    assert_eq!(
        metric(&relay.admin, "tether_kv_events_resets_total", ""),
        0.0
    );

    // 8 families of prompts sharing a 4-block opening, each with its own
    // 2–5-block tail: ~200 distinct blocks through a 48-block cache.
    let mut prompts = Vec::new();
    let mut during = Vec::new();
    for i in 0..48usize {
        let family = i % 8;
        let tail = 32 + (i * 37 % 4) * 16;
        let text = format!(
            "{} {}",
            words(family * 100_000, 64),
            words(1_000_000 + i * 1000, tail)
        );
        complete(&client, &url, &text).await?;
        prompts.push(block_hashes(&tokenize(&text), 16));
        if i % 8 == 7 {
            let held = engine_blocks(&client, &url).await?;
            let ix = index.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            during.push(agreement(&ix, &held, &prompts));
        }
    }
    let mut settled = 0.0;
    for _ in 0..1500 {
        let held = engine_blocks(&client, &url).await?;
        settled = {
            let ix = index.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
            agreement(&ix, &held, &prompts)
        };
        if settled >= 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held = engine_blocks(&client, &url).await?.len();
    let blocks = index.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.len();
    println!(
        "index agreement with the engine: {during:?} while loading, {settled} settled; engine holds {held} blocks, index {blocks}"
    );
    assert!(settled >= 0.99, "agreement {settled}");
    assert_eq!(held, blocks);
    applier.abort();
    root.cancel();
    Ok(())
}

/// With `--block-hashes engine-sim` the ingress sends the very block hashes
/// engine-sim caches (and publishes), for chats and completions alike.
#[test]
fn the_ingress_computes_engine_sims_block_hashes() -> anyhow::Result<()> {
    use tether_engine_sim::openai::{Completion, Kind};
    use tether_ingress::request::{CallBody, Endpoint};
    let long = words(0, 70);
    let chat = serde_json::json!({
        "model": "tether-sim",
        "messages": [
            {"role": "system", "content": "be  brief\nplease"},
            {"role": "user", "content": [{"type": "text", "text": long}, {"type": "text", "text": "and more"}]},
        ],
    });
    let completion =
        serde_json::json!({"model": "tether-sim", "prompt": [long.clone(), "tail words"]});
    for (kind, endpoint, body) in [
        (Kind::Chat, Endpoint::Chat, &chat),
        (Kind::Completion, Endpoint::Completions, &completion),
    ] {
        let bytes = serde_json::to_vec(body)?;
        let sim = Completion::parse(kind, &bytes, &SimConfig::default())
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let expected = block_hashes(&tokenize(&sim.prompt), 16);
        let ingress =
            CallBody::parse(endpoint, bytes.into()).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let got = tether_protocol::sim_token_blocks(&ingress.sim_prompt_text(), 16);
        assert!(expected.len() >= 4);
        assert_eq!(got, expected);
    }
    Ok(())
}
