//! Configuration. Every knob is a flag with an environment fallback and a
//! default; `--config file.toml` supplies the rest.

use clap::Parser;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, Parser)]
#[command(
    name = "tether-ingress",
    version,
    about = "Tether's OpenAI-compatible ingress",
    args_override_self = true
)]
pub struct Config {
    /// Optional TOML file with values for any of these flags.
    #[arg(long, env = "TETHER_CONFIG")]
    pub config: Option<PathBuf>,
    /// HTTP listen address (the OpenAI API, /metrics, /health, /ready).
    #[arg(long, env = "TETHER_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub bus: tether_bus::BusArgs,
    /// The fleet file (engines: name, url, models, capabilities).
    #[arg(long, env = "TETHER_FLEET", default_value = "deploy/local/fleet.toml")]
    pub fleet: PathBuf,
    /// Request headers that carry the session key, first present wins.
    #[arg(
        long,
        env = "TETHER_SESSION_HEADERS",
        value_delimiter = ',',
        default_value = "x-session-id"
    )]
    pub session_headers: Vec<String>,
    /// Body field that carries the session key when no header does ("" disables).
    #[arg(long, env = "TETHER_SESSION_FIELD", default_value = "session_id")]
    pub session_field: String,
    /// How long to wait for the scheduler's decision before deciding locally, ms.
    #[arg(long, env = "TETHER_ROUTE_TIMEOUT_MS", default_value_t = 50)]
    pub route_timeout_ms: u64,
    /// Largest accepted request body, bytes.
    #[arg(long, env = "TETHER_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Timeout for the engine's response headers of a non-streaming call,
    /// seconds (an engine sends them only with the whole answer).
    #[arg(long, env = "TETHER_ENGINE_TIMEOUT_SECS", default_value_t = 600)]
    pub engine_timeout_secs: u64,
    /// Time-to-first-byte timeout: how long a streaming call waits for the
    /// engine's response headers and its first stream data, together,
    /// before the engine counts as hung and the call is retried elsewhere,
    /// seconds. Capped by --engine-timeout-secs.
    #[arg(long, env = "TETHER_ENGINE_TTFB_TIMEOUT_SECS", default_value_t = 30.0)]
    pub engine_ttfb_timeout_secs: f64,
    /// Stall bound: an engine on which calls have waited this long for
    /// their answer to begin, while its token counters (`/metrics`) stood
    /// still, is marked stalled — unhealthy for as long again — and its
    /// waiting calls are retried elsewhere; seconds, 0 disables. Catches a
    /// hung engine for calls that do not stream.
    #[arg(long, env = "TETHER_ENGINE_STALL_SECS", default_value_t = 30.0)]
    pub engine_stall_secs: f64,
    /// Engines a call may try in all: a call is retried on another engine
    /// while nothing has reached the client (connect error, 5xx, timeout
    /// before the response headers). 1 disables retries.
    #[arg(long, env = "TETHER_ENGINE_ATTEMPTS", default_value_t = 3)]
    pub engine_attempts: u32,
    /// Consecutive failed calls that eject an engine (circuit breaker; 0 disables).
    #[arg(long, env = "TETHER_BREAKER_FAILURES", default_value_t = 3)]
    pub breaker_failures: u32,
    /// How long an ejected engine stays out before calls probe it again, ms.
    #[arg(long, env = "TETHER_BREAKER_COOLDOWN_MS", default_value_t = 10_000)]
    pub breaker_cooldown_ms: u64,
    /// Sessions whose last engine this ingress remembers for its fallback
    /// route (when the scheduler cannot answer); 0 disables.
    #[arg(long, env = "TETHER_AFFINITY_CACHE", default_value_t = 100_000)]
    pub affinity_cache: usize,
    /// A connection must send a request's headers within this time, seconds;
    /// also the idle timeout of a kept-alive connection (0 disables).
    #[arg(long, env = "TETHER_HEADER_READ_TIMEOUT_SECS", default_value_t = 30)]
    pub header_read_timeout_secs: u64,
    /// A request body must arrive within this time, seconds (0 disables).
    #[arg(long, env = "TETHER_BODY_READ_TIMEOUT_SECS", default_value_t = 30)]
    pub body_read_timeout_secs: u64,
    /// Request-body bytes the ingress holds at once, over all calls; calls
    /// beyond get 503 with Retry-After.
    #[arg(long, env = "TETHER_MAX_BUFFERED_BODY_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_buffered_body_bytes: usize,
    /// File of API keys, one `tenant:<sha256 of the key, hex>` a line; with
    /// any keys configured every /v1 call needs `Authorization: Bearer <key>`.
    #[arg(long, env = "TETHER_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// API keys as a comma-separated list of `tenant:<sha256 hex>` (added to the file's).
    #[arg(
        long,
        env = "TETHER_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,
    /// Secret salt of implicit session keys (keyed hashes that cannot be
    /// computed, hence probed, from outside); empty: unkeyed. Every ingress
    /// replica needs the same salt.
    #[arg(
        long,
        env = "TETHER_SESSION_KEY_SALT",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub session_key_salt: String,
    /// File holding the salt of implicit session keys (instead of --session-key-salt).
    #[arg(long, env = "TETHER_SESSION_KEY_SALT_FILE")]
    pub session_key_salt_file: Option<PathBuf>,
    /// Serve /metrics and the session view on this separate address instead
    /// of the public one (/health and /ready are on both).
    #[arg(long, env = "TETHER_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    /// Engine health-probe interval, ms.
    #[arg(long, env = "TETHER_HEALTH_INTERVAL_MS", default_value_t = 500)]
    pub health_interval_ms: u64,
    /// Lifecycle events buffered for publishing before new ones are dropped (and counted).
    #[arg(long, env = "TETHER_EVENT_BUFFER", default_value_t = 65536)]
    pub event_buffer: usize,
    /// Wait for the events stream to acknowledge each lifecycle event, and
    /// publish it again (same id, stored once) when no acknowledgement
    /// comes; false: core publishes, which a stream may miss under faults.
    #[arg(long, env = "TETHER_EVENT_ACKS", default_value_t = true, action = clap::ArgAction::Set)]
    pub event_acks: bool,
    /// Events awaiting the stream's acknowledgement at once (with --event-acks).
    #[arg(long, env = "TETHER_EVENT_ACK_WINDOW", default_value_t = 256)]
    pub event_ack_window: usize,
    /// How long an event's acknowledgement is awaited before it is sent again, ms.
    #[arg(long, env = "TETHER_EVENT_ACK_TIMEOUT_MS", default_value_t = 2000)]
    pub event_ack_timeout_ms: u64,
    /// Calls that may wait per engine when it is at its concurrency limit (429 beyond).
    #[arg(long, env = "TETHER_MAX_QUEUE", default_value_t = 1024)]
    pub max_queue: usize,
    /// Ingress replicas sharing each engine's concurrency limit (each takes ⌈limit/replicas⌉).
    #[arg(long, env = "TETHER_INGRESS_REPLICAS", default_value_t = 1)]
    pub ingress_replicas: u32,
    /// The gateway queue's anti-starvation β: a call waiting β·max(service, floor) is served as level 0 (0 disables).
    #[arg(long, env = "TETHER_QUEUE_STARVATION_RATIO", default_value_t = 2.0)]
    pub queue_starvation_ratio: f64,
    /// The service floor of the queue's starvation bound, seconds.
    #[arg(long, env = "TETHER_SERVICE_FLOOR", default_value_t = 1.0)]
    pub service_floor: f64,
    /// γ of the gateway queue's due time, `arrival + γ · uncached prefill`,
    /// that orders calls of one level (0: arrival order).
    #[arg(long, env = "TETHER_QUEUE_SIZE_RATIO", default_value_t = 0.0)]
    pub queue_size_ratio: f64,
    /// Most calls staged on an engine — sent, no first token back yet —
    /// before the gateway holds further calls for it (in Tether's order,
    /// free to bind late); 0 disables staging. A call the engine runs
    /// answers its first token within a step or two of prefill; one that
    /// does not is queued in the engine. Default 8, the value the load sweep
    /// measured (docs/policy.md, "Staging").
    #[arg(long, env = "TETHER_STAGE_CALLS", default_value_t = 8)]
    pub stage_calls: usize,
    /// Most prefill tokens (uncached prompt, estimated) staged on an engine;
    /// 0: no token bound. An engine with nothing staged always takes a call.
    /// Default: two steps of vLLM's default `max_num_batched_tokens` (8,192).
    #[arg(long, env = "TETHER_STAGE_TOKENS", default_value_t = 16384.0)]
    pub stage_tokens: f64,
    /// Decode balance: an engine holds back a call of at least one step of
    /// prefill (half `--stage-tokens`) while another engine that is still
    /// prefilling has more than this many fewer calls decoding, so that the
    /// held engine's answers get decode-only steps; 0 disables. A starving
    /// call is never held. Default 1, the value the load sweep measured
    /// (docs/policy.md, "Decode balance").
    #[arg(long, env = "TETHER_DECODE_BALANCE", default_value_t = 1)]
    pub decode_balance: usize,
    /// Learn each engine's limit from its metrics (waiting queue, KV usage) so
    /// calls wait at the gateway, not in the engine; false (the default): the
    /// fleet file's `max_concurrency` is a fixed limit. Off by default:
    /// measured, holding calls at the gateway cost more time to first token
    /// than ordering them won (docs/policy.md).
    #[arg(long, env = "TETHER_CAPACITY_CONTROL", default_value_t = false, action = clap::ArgAction::Set)]
    pub capacity_control: bool,
    /// Calls an engine may queue before the gateway lowers its limit.
    #[arg(long, env = "TETHER_CAPACITY_TARGET_WAITING", default_value_t = 1.0)]
    pub capacity_target_waiting: f64,
    /// KV-cache usage (0..1) above which an engine's limit does not grow.
    #[arg(long, env = "TETHER_CAPACITY_KV_HIGH", default_value_t = 0.95)]
    pub capacity_kv_high: f64,
    /// Interval of the capacity control's engine-metrics scrape, ms.
    #[arg(long, env = "TETHER_CAPACITY_INTERVAL_MS", default_value_t = 100)]
    pub capacity_interval_ms: u64,
    /// Request headers whose presence marks the session as an agent program
    /// (ordered by attained service); empty disables.
    #[arg(
        long,
        env = "TETHER_PROGRAM_HEADERS",
        value_delimiter = ',',
        default_value = "x-claude-code-session-id"
    )]
    pub program_headers: Vec<String>,
    /// The prompt block hashes sent with route requests: `text` (256-byte
    /// text blocks, for the scheduler's approximate index) or `engine-sim`
    /// (engine-sim's own token-block hashes, as its KV events carry them,
    /// for the scheduler's exact index, `--prefix-source exact`).
    #[arg(long, env = "TETHER_BLOCK_HASHES", default_value = "text", value_parser = ["text", "engine-sim"])]
    pub block_hashes: String,
    /// Tokens per KV block of the engines, for `--block-hashes engine-sim`.
    #[arg(long, env = "TETHER_BLOCK_SIZE", default_value_t = 16)]
    pub block_size: usize,
    /// Engine seconds per wall second, for simulated engines that run faster
    /// than real time (engine-sim `--time-scale`): the gateway divides its
    /// waiting bounds (bind delay, starvation) by it. 1 for real engines.
    #[arg(long, env = "TETHER_TIME_SCALE", default_value_t = 1.0)]
    pub time_scale: f64,
    /// Service cost of one prefilled (uncached) prompt token, seconds.
    #[arg(long, env = "TETHER_COST_PREFILL_PER_TOKEN", default_value_t = 0.0001)]
    pub cost_prefill_per_token: f64,
    /// Service cost of one generated token, seconds.
    #[arg(long, env = "TETHER_COST_DECODE_PER_TOKEN", default_value_t = 0.01)]
    pub cost_decode_per_token: f64,
}
