//! The test universe: a whole Tether system in one test process — a real
//! nats-server on a free port, a fleet of engine-sims on loopback, and
//! session-state, scheduler and ingress started in-process, each with its own
//! shutdown token so a test can stop one part and watch the rest cope.
//! Dropping the universe stops everything it started.
#![forbid(unsafe_code)]

use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_engine_sim::SimConfig;
use tether_fleet::{EngineConfig, EngineKind, FleetConfig};
use tether_telemetry::Shutdown;
use tether_testkit::NatsServer;
use tether_testkit::http::{self, HttpClient, Reply};

pub use tether_testkit;

/// The model the simulated fleet serves.
pub const MODEL: &str = "tether-sim";

pub struct Options {
    pub engines: usize,
    pub shards: u16,
    /// Engines (by index) that accept a request `priority`.
    pub priority_engines: Vec<usize>,
    /// Adjusts each engine-sim's configuration (index, config).
    pub sim: fn(usize, &mut SimConfig),
    /// Extra flags for the scheduler.
    pub scheduler_args: Vec<String>,
    /// Extra flags for the ingress.
    pub ingress_args: Vec<String>,
    /// Each engine's concurrency limit in the fleet file.
    pub max_concurrency: u32,
    /// More engines for the fleet, served by the test itself: (name, url).
    pub extra_engines: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            engines: 4,
            shards: 4,
            priority_engines: vec![],
            sim: |_, _| {},
            scheduler_args: vec![],
            ingress_args: vec![],
            max_concurrency: 256,
            extra_engines: vec![],
        }
    }
}

pub struct Universe {
    pub nats: NatsServer,
    pub fleet: Arc<FleetConfig>,
    pub engine_addrs: Vec<SocketAddr>,
    pub ingress: tether_ingress::Running,
    pub scheduler: Option<tether_scheduler::Running>,
    pub session_state: tether_session_state::Running,
    pub http: HttpClient,
    pub shards: u16,
    root: Shutdown,
    scheduler_stop: Shutdown,
    scheduler_args: Vec<String>,
}

fn args(base: &[&str], extra: &[String]) -> Vec<String> {
    base.iter()
        .map(|s| (*s).to_owned())
        .chain(extra.iter().cloned())
        .collect()
}

impl Universe {
    pub async fn start(opts: Options) -> anyhow::Result<Self> {
        let nats = NatsServer::start()?;
        let root = Shutdown::new();
        let mut engines = Vec::new();
        let mut engine_addrs = Vec::new();
        for i in 0..opts.engines {
            let name = format!("sim-{i}");
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = listener.local_addr()?;
            let mut cfg = SimConfig::named(&name);
            (opts.sim)(i, &mut cfg);
            let stop = root.child_token();
            tokio::spawn(async move {
                if let Err(err) =
                    tether_engine_sim::serve(listener, cfg, async move { stop.cancelled().await })
                        .await
                {
                    eprintln!("engine-sim failed: {err}");
                }
            });
            engines.push(EngineConfig {
                name,
                url: format!("http://{addr}"),
                models: vec![MODEL.to_owned()],
                kind: EngineKind::Vllm,
                priority: opts.priority_engines.contains(&i),
                max_concurrency: opts.max_concurrency,
                cache_tokens: 450_000,
                kv_events: None,
                kv_replay: None,
            });
            engine_addrs.push(addr);
        }
        for (name, url) in &opts.extra_engines {
            engines.push(EngineConfig {
                name: name.clone(),
                url: url.clone(),
                models: vec![MODEL.to_owned()],
                kind: EngineKind::Vllm,
                priority: false,
                max_concurrency: opts.max_concurrency,
                cache_tokens: 450_000,
                kv_events: None,
                kv_replay: None,
            });
        }
        let fleet = Arc::new(FleetConfig { engines });
        fleet.validate()?;
        let url = nats.url();
        let shards = opts.shards.to_string();

        let session_state = tether_session_state::start(
            <tether_session_state::Config as clap_parse::Parse>::parse(&args(
                &[
                    "x",
                    "--nats-url",
                    &url,
                    "--shards",
                    &shards,
                    "--admin-listen",
                    "127.0.0.1:0",
                    "--delta-interval-ms",
                    "2",
                ],
                &[],
            ))?,
            root.child_token(),
        )
        .await?;

        let scheduler_stop = root.child_token();
        let scheduler = Some(
            start_scheduler(
                &url,
                &shards,
                &opts.scheduler_args,
                fleet.clone(),
                scheduler_stop.clone(),
            )
            .await?,
        );

        let ingress = tether_ingress::start_with_fleet(
            <tether_ingress::Config as clap_parse::Parse>::parse(&args(
                &[
                    "x",
                    "--nats-url",
                    &url,
                    "--shards",
                    &shards,
                    "--listen",
                    "127.0.0.1:0",
                    "--health-interval-ms",
                    "100",
                ],
                &opts.ingress_args,
            ))?,
            fleet.clone(),
            root.child_token(),
        )
        .await?;

        let u = Self {
            nats,
            fleet,
            engine_addrs,
            ingress,
            scheduler,
            session_state,
            http: http::client(),
            shards: opts.shards,
            root,
            scheduler_stop,
            scheduler_args: opts.scheduler_args,
        };
        u.wait_ready().await?;
        Ok(u)
    }

    async fn wait_ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let sched = self.scheduler.as_ref().is_none_or(|s| s.admin.is_ready());
            let ingress = self.ingress.admin.is_ready() && self.ingress.app.bus.is_connected();
            let engines_up = self.engines_answer().await;
            if sched && ingress && engines_up {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "universe not ready: scheduler {sched}, ingress {ingress}, engines {engines_up}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn engines_answer(&self) -> bool {
        for a in &self.engine_addrs {
            match http::get(&self.http, &format!("http://{a}/health")).await {
                Ok(r) if r.status == 200 => {}
                _ => return false,
            }
        }
        true
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.ingress.addr, path)
    }

    /// A chat call with a session header.
    pub async fn chat(
        &self,
        session: Option<&str>,
        content: &str,
        max_tokens: u32,
    ) -> anyhow::Result<Reply> {
        let body = serde_json::json!({
            "model": MODEL,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": content}],
        });
        let headers: Vec<(&str, &str)> = session
            .map(|s| vec![("x-session-id", s)])
            .unwrap_or_default();
        http::post_json(
            &self.http,
            &self.url("/v1/chat/completions"),
            &headers,
            &body,
        )
        .await
    }

    /// The system's view of a session, polled until `ready` accepts it.
    pub async fn session_until(
        &self,
        key: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let r = http::get(&self.http, &self.url(&format!("/v1/tether/sessions/{key}"))).await?;
            let v = r.json();
            if r.status == 200 && ready(&v) {
                return Ok(v);
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "session {key} never reached the expected state; last: {} {}",
                r.status,
                r.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A metric's value from the ingress's /metrics (sum over label sets that
    /// contain `labels`).
    pub async fn ingress_metric(&self, name: &str, labels: &str) -> anyhow::Result<f64> {
        let text = http::get(&self.http, &self.url("/metrics")).await?.text();
        Ok(metric_sum(&text, name, labels))
    }

    /// Starts one more scheduler replica (same queue group), stopped with the universe.
    pub async fn extra_scheduler(&self) -> anyhow::Result<tether_scheduler::Running> {
        start_scheduler(
            &self.nats.url(),
            &self.shards.to_string(),
            &self.scheduler_args,
            self.fleet.clone(),
            self.root.child_token(),
        )
        .await
    }

    /// Stops the scheduler (its route subscription goes away).
    pub async fn stop_scheduler(&mut self) {
        self.scheduler_stop.cancel();
        if let Some(s) = self.scheduler.take() {
            s.join().await;
        }
    }

    /// Starts a scheduler again.
    pub async fn restart_scheduler(&mut self) -> anyhow::Result<()> {
        self.scheduler_stop = self.root.child_token();
        let s = start_scheduler(
            &self.nats.url(),
            &self.shards.to_string(),
            &self.scheduler_args,
            self.fleet.clone(),
            self.scheduler_stop.clone(),
        )
        .await?;
        self.scheduler = Some(s);
        self.wait_ready().await
    }
}

async fn start_scheduler(
    url: &str,
    shards: &str,
    extra: &[String],
    fleet: Arc<FleetConfig>,
    stop: Shutdown,
) -> anyhow::Result<tether_scheduler::Running> {
    tether_scheduler::start_with_fleet(
        <tether_scheduler::Config as clap_parse::Parse>::parse(&args(
            &[
                "x",
                "--nats-url",
                url,
                "--shards",
                shards,
                "--admin-listen",
                "127.0.0.1:0",
                "--scrape-interval-ms",
                "100",
            ],
            extra,
        ))?,
        fleet,
        stop,
    )
    .await
    .context("starting the scheduler")
}

impl Drop for Universe {
    fn drop(&mut self) {
        self.root.cancel();
    }
}

/// Sums the samples of `name` whose label set contains `labels`
/// (e.g. `reason="timeout"`, comma-separated pairs; empty matches all).
/// Counters may carry a `_total` suffix. Read by the shared parser.
pub fn metric_sum(text: &str, name: &str, labels: &str) -> f64 {
    let want = if labels.is_empty() {
        Vec::new()
    } else {
        match tether_fleet::prom::parse(&format!("x{{{labels}}} 0")) {
            Ok(mut s) => s.pop().map(|s| s.labels).unwrap_or_default(),
            // A filter that is no label set matches nothing.
            Err(_) => return 0.0,
        }
    };
    let want: Vec<(&str, &str)> = want.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    tether_fleet::prom::sum(text, name, &want)
}

/// Parsing service configs from argument lists (clap, kept out of the tests' sight).
mod clap_parse {
    pub trait Parse: Sized {
        fn parse(args: &[String]) -> anyhow::Result<Self>;
    }
    impl<T: clap::Parser> Parse for T {
        fn parse(args: &[String]) -> anyhow::Result<Self> {
            Ok(T::try_parse_from(args)?)
        }
    }
}
