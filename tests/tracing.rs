//! Observability, end to end. One HTTP request is one trace across ingress,
//! scheduler and session-state: the W3C trace context travels in NATS
//! headers. The first test captures spans of the in-process services with
//! the OpenTelemetry SDK's in-memory exporter (this file is its own test
//! process, because the tracing subscriber is global); the others run the
//! real service binaries (built by `just test` before the tests) against an
//! OTLP/gRPC collector inside the test, and scrape their `/metrics`.

use anyhow::Context as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use std::time::{Duration, Instant};
use tether_universe::{Options, Universe};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_services() -> anyhow::Result<()> {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let _guard = tether_telemetry::init_with_provider("tether-tests", provider)?;

    let u = Universe::start(Options::default()).await?;
    let r = u.chat(Some("traced"), "follow me", 4).await?;
    assert_eq!(r.status, 200, "{}", r.text());

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let spans = exporter.get_finished_spans()?;
        let trace_of = |name: &str| {
            spans
                .iter()
                .filter(|s| s.name == name)
                .map(|s| s.span_context.trace_id())
                .collect::<Vec<_>>()
        };
        let ingress = trace_of("POST /v1/chat/completions");
        if let Some(trace) = ingress.first() {
            let scheduler = trace_of("scheduler.route");
            let state = trace_of("session_state.apply");
            // Both lifecycle events (dispatched, finished) reach session-state.
            if scheduler.contains(trace) && state.iter().filter(|t| *t == trace).count() >= 2 {
                assert_eq!(ingress.len(), 1);
                return Ok(());
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "spans never formed one trace: {:?}",
            spans
                .iter()
                .map(|s| (s.name.to_string(), s.span_context.trace_id()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The real binaries, over the wire: an OTLP/gRPC collector in this test
/// receives what `tether-ingress`, `tether-scheduler` and
/// `tether-session-state` export when `OTEL_EXPORTER_OTLP_ENDPOINT` points at
/// it, and one request forms one trace with the expected parents, kinds and
/// attributes — and never the raw session key or prompt text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_as_one_tree() -> anyhow::Result<()> {
    use wire::{Kind, attr};
    let collector = wire::Collector::start().await?;
    let stack = wire::Stack::start(&[(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        format!("http://{}", collector.addr),
    )])
    .await?;
    const KEY: &str = "otlp-raw-session-key-7f3a";
    const PROMPT: &str = "otlp prompt text that must not leave the process";
    let r = stack.chat(KEY, PROMPT).await?;
    anyhow::ensure!(r.status == 200, "chat failed: {} {}", r.status, r.text());

    let hash = format!(
        "{:016x}",
        tether_protocol::SessionKey::explicit(KEY)?.hash()
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let spans = loop {
        let spans = collector.spans();
        if wire::Tree::find(&spans).is_some_and(|t| t.complete()) {
            break spans;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "no complete trace arrived; spans seen: {:#?}\n{}",
                spans
                    .iter()
                    .map(|s| (s.service.as_str(), s.span.name.as_str(), s.span.kind))
                    .collect::<Vec<_>>(),
                stack.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let tree = wire::Tree::find(&spans).context("trace vanished")?;

    // ingress HTTP server span: the root, with HTTP, GenAI and Tether attributes.
    let root = tree.root;
    assert_eq!(root.service, "tether-ingress");
    assert_eq!(root.span.name, "POST /v1/chat/completions");
    assert_eq!(root.kind(), Kind::Server);
    assert_eq!(attr(root, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(
        attr(root, "http.route").as_deref(),
        Some("/v1/chat/completions")
    );
    assert_eq!(
        attr(root, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(
        attr(root, "gen_ai.request.model").as_deref(),
        Some(wire::MODEL)
    );
    assert_eq!(
        attr(root, "tether.session.hash").as_deref(),
        Some(hash.as_str())
    );
    assert_eq!(
        attr(root, "tether.route.fallback").as_deref(),
        Some("false")
    );
    let reason = attr(root, "tether.route.reason").expect("route reason");
    assert!(attr(root, "tether.level").is_some());
    assert!(attr(root, "tether.queue.wait_seconds").is_some());
    let engine = attr(root, "engine").expect("engine");
    assert!(attr(root, "gen_ai.usage.input_tokens").is_some());
    assert_eq!(
        attr(root, "gen_ai.usage.output_tokens").as_deref(),
        Some("4")
    );

    // route request (client) → scheduler decision (server), across processes.
    let route = tree.only_child(root, Kind::Client, "request tether.route")?;
    assert_eq!(attr(route, "messaging.system").as_deref(), Some("nats"));
    assert_eq!(
        attr(route, "messaging.destination.name").as_deref(),
        Some("tether.route")
    );
    let decision = tree.only_child(route, Kind::Server, "scheduler.route")?;
    assert_eq!(decision.service, "tether-scheduler");
    assert_eq!(attr(decision, "tether.route.reason"), Some(reason));
    assert_eq!(attr(decision, "engine"), Some(engine.clone()));
    assert_eq!(
        attr(decision, "tether.session.hash").as_deref(),
        Some(hash.as_str())
    );
    assert_eq!(
        attr(decision, "messaging.operation.type").as_deref(),
        Some("process")
    );

    // engine call (HTTP client, GenAI).
    let call = tree.only_child(root, Kind::Client, "POST")?;
    assert_eq!(
        attr(call, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(call, "gen_ai.operation.name").as_deref(), Some("chat"));
    assert_eq!(attr(call, "tether.engine"), Some(engine));

    // event publish (producer) → session-state apply (consumer): dispatched
    // and finished, each on the session's shard.
    let publishes = tree.children(root, Kind::Producer);
    assert!(publishes.len() >= 2, "{publishes:?}");
    for p in &publishes {
        assert!(
            p.span.name.starts_with("publish tether.events."),
            "{}",
            p.span.name
        );
        let applied = tree.only_child(p, Kind::Consumer, "session_state.apply")?;
        assert_eq!(applied.service, "tether-session-state");
        assert_eq!(
            attr(applied, "tether.session.hash").as_deref(),
            Some(hash.as_str())
        );
    }

    // Nothing in any span carries the raw key or the prompt.
    for s in &tree.spans {
        for a in &s.span.attributes {
            let v = wire::value(a.value.as_ref()).unwrap_or_default();
            assert!(
                !v.contains(KEY) && !v.contains(PROMPT),
                "{} leaks {}={v}",
                s.span.name,
                a.key
            );
        }
    }
    stack.stop();
    collector.stop();
    Ok(())
}

/// Every service's `/metrics`, scraped from the real binaries after one
/// call: the whole text parses as Prometheus text (the shared parser,
/// strictly), every metric that `docs/observability.md` documents for the
/// service is there with the documented type, labels come from a bounded set,
/// and no label value carries the session key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_exposes_its_documented_metrics() -> anyhow::Result<()> {
    use tether_fleet::prom;
    let stack = wire::Stack::start(&[]).await?;
    const KEY: &str = "metrics-raw-session-key-51c2";
    let r = stack.chat(KEY, "count me").await?;
    anyhow::ensure!(r.status == 200, "chat failed: {} {}", r.status, r.text());

    let doc = std::fs::read_to_string(
        tether_universe::tether_testkit::workspace_root().join("docs/observability.md"),
    )?;
    // Rows of the metrics table: | `name` | type | service | labels | meaning |
    struct Doc {
        name: String,
        kind: String,
        services: Vec<String>,
        labelled: bool,
    }
    let documented: Vec<Doc> = doc
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            name.starts_with("tether_").then(|| Doc {
                name: name.to_owned(),
                kind: cells.get(2).copied().unwrap_or_default().to_owned(),
                services: cells
                    .get(3)
                    .copied()
                    .unwrap_or_default()
                    .split(',')
                    .map(|s| s.trim().to_owned())
                    .collect(),
                labelled: !cells.get(4).copied().unwrap_or_default().is_empty(),
            })
        })
        .collect();
    anyhow::ensure!(
        documented.len() >= 30,
        "metrics table not found in docs/observability.md"
    );
    const SERVICES: &[&str] = &["ingress", "scheduler", "session-state", "engine-sim", "all"];
    for d in &documented {
        for s in &d.services {
            assert!(
                SERVICES.contains(&s.as_str()),
                "{}: unknown service {s:?}",
                d.name
            );
        }
    }

    let mut targets = vec![("ingress", format!("http://{}/metrics", stack.ingress))];
    for (name, admin) in &stack.admins {
        let short = name.trim_start_matches("tether-");
        targets.push((short, format!("http://{admin}/metrics")));
    }
    targets.push((
        "engine-sim",
        format!("http://{}/metrics", stack.engines_at[0]),
    ));
    // Label names a Tether metric may carry: each takes a bounded set of values.
    const LABELS: &[&str] = &[
        "engine",
        "outcome",
        "reason",
        "binding",
        "affinity",
        "prefix",
        "kind",
        "source",
        "le",
        "shard",
        "model_name",
        "priority",
        "engine_kind",
        "tenant",
    ];
    for (service, url) in &targets {
        let text = tether_testkit_get(&stack, url).await?;
        let samples = prom::parse(&text).map_err(|e| anyhow::anyhow!("{service}: {e}"))?;
        let types: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| {
                let mut w = l.strip_prefix("# TYPE ")?.split_whitespace();
                Some((w.next()?.to_owned(), w.next()?.to_owned()))
            })
            .collect();
        for d in &documented {
            let here = d
                .services
                .iter()
                .any(|s| s == service || (s == "all" && *service != "engine-sim"));
            if !here {
                continue;
            }
            let found = types.iter().find(|(n, _)| *n == d.name);
            // A labelled metric appears once its first label set is counted.
            if found.is_none() && d.labelled {
                continue;
            }
            assert_eq!(
                found.map(|(_, k)| k.as_str()),
                Some(d.kind.as_str()),
                "{service}: {} ({}) documented but not exposed; exposed: {types:?}",
                d.name,
                d.kind
            );
        }
        for s in samples.iter().filter(|s| s.name.starts_with("tether_")) {
            for (k, v) in &s.labels {
                assert!(
                    LABELS.contains(&k.as_str()),
                    "{service}: {s} has an unbounded label {k}"
                );
                assert!(!v.contains(KEY), "{service}: {s} carries the session key");
            }
        }
    }
    // The call shows up where it should, labelled as documented.
    let ingress = tether_testkit_get(&stack, &targets[0].1).await?;
    assert_eq!(
        prom::sum(&ingress, "tether_ingress_calls", &[("outcome", "ok")]),
        1.0
    );
    assert_eq!(
        prom::sum(&ingress, "tether_ingress_route_seconds_count", &[]),
        1.0
    );
    let waits: Vec<_> = prom::samples(&ingress)
        .filter(|s| s.name == "tether_ingress_queue_wait_seconds_count")
        .collect();
    assert!(
        waits.iter().all(|s| s.label("engine").is_some()),
        "{waits:?}"
    );
    assert_eq!(waits.iter().map(|s| s.value).sum::<f64>(), 1.0);
    let decisions: Vec<_> = prom::samples(&ingress)
        .filter(|s| prom::is_named(&s.name, "tether_ingress_route_decisions"))
        .collect();
    assert!(
        decisions.iter().all(|s| s.label("reason").is_some()),
        "{decisions:?}"
    );
    assert_eq!(decisions.iter().map(|s| s.value).sum::<f64>(), 1.0);
    stack.stop();
    Ok(())
}

async fn tether_testkit_get(stack: &wire::Stack, url: &str) -> anyhow::Result<String> {
    let r = tether_universe::tether_testkit::http::get(&stack.http, url).await?;
    anyhow::ensure!(r.status == 200, "{url}: {}", r.status);
    Ok(r.text())
}

/// An in-test OTLP/gRPC collector and the real service binaries around it.
mod wire {
    use anyhow::Context;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::trace::v1::Span;
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};
    use tether_telemetry::Shutdown;
    use tether_testkit::http::{self, HttpClient, Reply};
    use tether_testkit::{NatsServer, free_port};

    pub const MODEL: &str = "tether-sim";

    /// A span as received, with the `service.name` of its resource.
    #[derive(Clone, Debug)]
    pub struct Received {
        pub service: String,
        pub span: Span,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Kind {
        Server,
        Client,
        Producer,
        Consumer,
        Other,
    }

    impl Received {
        pub fn kind(&self) -> Kind {
            use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
            match SpanKind::try_from(self.span.kind) {
                Ok(SpanKind::Server) => Kind::Server,
                Ok(SpanKind::Client) => Kind::Client,
                Ok(SpanKind::Producer) => Kind::Producer,
                Ok(SpanKind::Consumer) => Kind::Consumer,
                _ => Kind::Other,
            }
        }
    }

    /// An attribute's value as text (numbers and booleans as Rust prints them).
    pub fn value(v: Option<&AnyValue>) -> Option<String> {
        match v?.value.as_ref()? {
            any_value::Value::StringValue(s) => Some(s.clone()),
            any_value::Value::BoolValue(b) => Some(b.to_string()),
            any_value::Value::IntValue(i) => Some(i.to_string()),
            any_value::Value::DoubleValue(d) => Some(d.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    fn find<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a KeyValue> {
        attrs.iter().find(|a| a.key == key)
    }

    pub fn attr(s: &Received, key: &str) -> Option<String> {
        find(&s.span.attributes, key).and_then(|a| value(a.value.as_ref()))
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Received>>>);

    #[tonic::async_trait]
    impl TraceService for Sink {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let mut out = self
                .0
                .lock()
                .map_err(|_| tonic::Status::internal("collector lock poisoned"))?;
            for rs in request.into_inner().resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| find(&r.attributes, "service.name"))
                    .and_then(|a| value(a.value.as_ref()))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        out.push(Received {
                            service: service.clone(),
                            span,
                        });
                    }
                }
            }
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    pub struct Collector {
        pub addr: SocketAddr,
        sink: Sink,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
    }

    impl Collector {
        pub async fn start() -> anyhow::Result<Self> {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let sink = Sink::default();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = tonic::transport::Server::builder().serve_with_incoming_shutdown(
                TraceServiceServer::new(sink.clone()),
                tonic::transport::server::TcpIncoming::from(listener),
                async move {
                    let _ = stopped.await;
                },
            );
            tokio::spawn(async move {
                if let Err(err) = server.await {
                    eprintln!("collector failed: {err}");
                }
            });
            Ok(Self {
                addr,
                sink,
                stop: Some(stop),
            })
        }

        pub fn spans(&self) -> Vec<Received> {
            self.sink.0.lock().map(|v| v.clone()).unwrap_or_default()
        }

        pub fn stop(mut self) {
            if let Some(s) = self.stop.take() {
                let _ = s.send(());
            }
        }
    }

    /// The spans of the trace rooted at the ingress's server span.
    pub struct Tree<'a> {
        pub root: &'a Received,
        pub spans: Vec<&'a Received>,
    }

    impl<'a> Tree<'a> {
        pub fn find(spans: &'a [Received]) -> Option<Self> {
            let root = spans
                .iter()
                .find(|s| s.service == "tether-ingress" && s.span.parent_span_id.is_empty())?;
            let spans = spans
                .iter()
                .filter(|s| s.span.trace_id == root.span.trace_id)
                .collect();
            Some(Self { root, spans })
        }

        pub fn children(&self, parent: &Received, kind: Kind) -> Vec<&'a Received> {
            self.spans
                .iter()
                .copied()
                .filter(|s| s.span.parent_span_id == parent.span.span_id && s.kind() == kind)
                .collect()
        }

        pub fn only_child(
            &self,
            parent: &Received,
            kind: Kind,
            name: &str,
        ) -> anyhow::Result<&'a Received> {
            let found: Vec<_> = self
                .children(parent, kind)
                .into_iter()
                .filter(|s| s.span.name == name)
                .collect();
            anyhow::ensure!(
                found.len() == 1,
                "expected one {kind:?} span {name:?} under {:?}, found {}",
                parent.span.name,
                found.len()
            );
            Ok(found[0])
        }

        /// Every hop has arrived: the decision, the engine call, and both
        /// lifecycle events applied by session-state.
        pub fn complete(&self) -> bool {
            let has = |service: &str, name: &str| {
                self.spans
                    .iter()
                    .filter(|s| s.service == service && s.span.name == name)
                    .count()
            };
            has("tether-scheduler", "scheduler.route") >= 1
                && has("tether-ingress", "POST") >= 1
                && has("tether-session-state", "session_state.apply") >= 2
        }
    }

    /// A real nats-server, in-process engine-sims, and the three service
    /// binaries as child processes (stopped with SIGTERM, then killed).
    pub struct Stack {
        _nats: NatsServer,
        engines: Shutdown,
        children: Vec<(String, Child)>,
        dir: PathBuf,
        pub ingress: SocketAddr,
        /// Admin endpoints (`/metrics`) of session-state and the scheduler.
        pub admins: Vec<(&'static str, String)>,
        pub engines_at: Vec<SocketAddr>,
        pub http: HttpClient,
    }

    /// The service binaries sit beside this test's own directory
    /// (target/<profile>/); `just test` builds them first.
    fn binary(name: &str) -> anyhow::Result<PathBuf> {
        let exe = std::env::current_exe()?;
        let dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .context("test executable has no target directory")?;
        let path = dir.join(name);
        anyhow::ensure!(
            path.exists(),
            "{} is missing: build the binaries first (`cargo build --workspace --bins`; `just test` does)",
            path.display()
        );
        Ok(path)
    }

    impl Stack {
        pub async fn start(extra_env: &[(&str, String)]) -> anyhow::Result<Self> {
            let nats = NatsServer::start()?;
            let engines = Shutdown::new();
            let mut fleet = String::new();
            let mut engines_at = Vec::new();
            for i in 0..2 {
                let name = format!("sim-{i}");
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                let addr = listener.local_addr()?;
                engines_at.push(addr);
                let cfg = tether_engine_sim::SimConfig::named(&name);
                let stop = engines.child_token();
                tokio::spawn(async move {
                    let stopped = async move { stop.cancelled().await };
                    if let Err(err) = tether_engine_sim::serve(listener, cfg, stopped).await {
                        eprintln!("engine-sim failed: {err}");
                    }
                });
                fleet.push_str(&format!(
                    "[[engines]]\nname = \"{name}\"\nurl = \"http://{addr}\"\nmodels = [\"{MODEL}\"]\n\n"
                ));
            }
            let dir = std::env::temp_dir().join(format!(
                "tether-wire-{}-{}",
                std::process::id(),
                tether_protocol::random_u64()
            ));
            std::fs::create_dir_all(&dir)?;
            let fleet_path = dir.join("fleet.toml");
            std::fs::write(&fleet_path, fleet)?;
            let state_admin = format!("127.0.0.1:{}", free_port()?);
            let sched_admin = format!("127.0.0.1:{}", free_port()?);
            let ingress: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
            let mut stack = Self {
                _nats: nats,
                engines,
                children: Vec::new(),
                dir,
                ingress,
                admins: vec![
                    ("tether-session-state", state_admin.clone()),
                    ("tether-scheduler", sched_admin.clone()),
                ],
                engines_at,
                http: http::client(),
            };
            let common = [
                ("TETHER_NATS_URL", stack._nats.url()),
                ("TETHER_SHARDS", "4".to_owned()),
                ("TETHER_FLEET", fleet_path.display().to_string()),
                ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
                ("RUST_LOG", "info".to_owned()),
            ];
            let services = [
                (
                    "tether-session-state",
                    vec![("TETHER_ADMIN_LISTEN", state_admin.clone())],
                ),
                (
                    "tether-scheduler",
                    vec![("TETHER_ADMIN_LISTEN", sched_admin.clone())],
                ),
                (
                    "tether-ingress",
                    vec![
                        ("TETHER_LISTEN", ingress.to_string()),
                        ("TETHER_HEALTH_INTERVAL_MS", "100".to_owned()),
                    ],
                ),
            ];
            for (name, env) in services {
                let log = std::fs::File::create(stack.dir.join(format!("{name}.log")))?;
                let mut cmd = Command::new(binary(name)?);
                cmd.env_remove("TETHER_CONFIG")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log);
                for (k, v) in common.iter().chain(env.iter()) {
                    cmd.env(k, v);
                }
                for (k, v) in extra_env {
                    cmd.env(k, v);
                }
                let child = cmd.spawn().with_context(|| format!("starting {name}"))?;
                stack.children.push((name.to_owned(), child));
            }
            for url in [
                format!("http://{state_admin}/ready"),
                format!("http://{sched_admin}/ready"),
                format!("http://{ingress}/ready"),
            ] {
                stack.wait_ok(&url).await?;
            }
            Ok(stack)
        }

        async fn wait_ok(&mut self, url: &str) -> anyhow::Result<()> {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if http::get(&self.http, url)
                    .await
                    .is_ok_and(|r| r.status == 200)
                {
                    return Ok(());
                }
                let mut exited = None;
                for (name, child) in &mut self.children {
                    if let Some(status) = child.try_wait()? {
                        exited = Some(format!("{name} exited ({status})"));
                    }
                }
                if let Some(exited) = exited {
                    anyhow::bail!("{exited}\n{}", self.logs());
                }
                anyhow::ensure!(
                    Instant::now() < deadline,
                    "{url} never answered 200\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }

        pub async fn chat(&self, session: &str, content: &str) -> anyhow::Result<Reply> {
            let body = serde_json::json!({
                "model": MODEL,
                "max_tokens": 4,
                "messages": [{"role": "user", "content": content}],
            });
            http::post_json(
                &self.http,
                &format!("http://{}/v1/chat/completions", self.ingress),
                &[("x-session-id", session)],
                &body,
            )
            .await
        }

        /// The last lines each service wrote to stderr.
        pub fn logs(&self) -> String {
            let mut out = String::new();
            for (name, _) in &self.children {
                let text = std::fs::read_to_string(self.dir.join(format!("{name}.log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = text.lines().collect();
                let tail = lines[lines.len().saturating_sub(20)..].join("\n");
                out.push_str(&format!("--- {name} ---\n{tail}\n"));
            }
            out
        }

        pub fn stop(self) {}
    }

    impl Drop for Stack {
        fn drop(&mut self) {
            for (_, child) in &mut self.children {
                let _ = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status();
            }
            for (_, child) in &mut self.children {
                let deadline = Instant::now() + Duration::from_secs(5);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            self.engines.cancel();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
