//! Connecting to NATS, with the server's authentication and TLS.

use prometheus_client::metrics::{counter::Counter, family::Family};
use prometheus_client::registry::Registry;
use std::path::PathBuf;
use std::time::Duration;

/// Where and how to reach NATS.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// `nats://host:port` (comma-separated for a cluster).
    pub url: String,
    /// The client name the server shows (`nats server report connections`).
    pub name: String,
}

/// How to authenticate to NATS and secure the connection. At most one of
/// user/password, token, nkey seed and credentials file is used (in that
/// order of precedence); credentials in the URL (`nats://user:pass@host`,
/// `nats://token@host`) count when none is given here. TLS is used when the
/// URL says `tls://`, when [`BusAuth::tls_required`] is set, when a CA or a
/// client certificate is given, or when the server requires it.
#[derive(Clone, Default)]
pub struct BusAuth {
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// An nkey seed (`SU...`).
    pub nkey_seed: Option<String>,
    /// A `.creds` file (JWT and nkey seed, as `nsc` writes them).
    pub creds_file: Option<PathBuf>,
    /// PEM file of the CA that signed the server's certificate.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate and key, for servers that verify clients.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_required: bool,
}

impl std::fmt::Debug for BusAuth {
    // Secrets stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |o: bool| if o { "<set>" } else { "<none>" };
        f.debug_struct("BusAuth")
            .field("user", &self.user)
            .field("password", &set(self.password.is_some()))
            .field("token", &set(self.token.is_some()))
            .field("nkey_seed", &set(self.nkey_seed.is_some()))
            .field("creds_file", &self.creds_file)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_key", &self.tls_key)
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

/// Why the connection options could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error("bad NATS URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("reading the credentials file {path}: {source}")]
    Creds {
        path: String,
        source: std::io::Error,
    },
    #[error("a TLS client certificate needs both --nats-tls-cert and --nats-tls-key")]
    HalfClientCert,
    #[error(transparent)]
    Connect(#[from] async_nats::ConnectError),
}

/// Credentials embedded in a server URL, and the URL without them (the
/// client does not send URL credentials by itself).
#[derive(Debug, PartialEq)]
struct UrlAuth {
    /// Each server of the list, credentials removed.
    urls: Vec<String>,
    user: Option<String>,
    password: Option<String>,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(v) = u8::from_str_radix(hex, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Splits the credentials off every URL of a comma-separated list; the
/// first URL that carries some provides them.
fn split_url_auth(urls: &str) -> UrlAuth {
    let mut user = None;
    let mut password = None;
    let mut clean = Vec::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (Some(s), r),
            None => (None, url),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let host = match authority.rsplit_once('@') {
            Some((info, host)) => {
                if user.is_none() {
                    match info.split_once(':') {
                        Some((u, p)) => {
                            user = Some(percent_decode(u));
                            password = Some(percent_decode(p));
                        }
                        None => user = Some(percent_decode(info)),
                    }
                }
                host
            }
            None => authority,
        };
        clean.push(match scheme {
            Some(s) => format!("{s}://{host}{path}"),
            None => format!("{host}{path}"),
        });
    }
    UrlAuth {
        urls: clean,
        user,
        password,
    }
}

/// Counters fed by the client's connection events and by decoding, exposed
/// as Prometheus metrics by every service ([`BusStats::register`]).
#[derive(Debug, Clone, Default)]
pub struct BusStats {
    /// SlowConsumer events: a subscription fell behind and the client dropped
    /// messages.
    pub slow_consumer: Counter,
    pub disconnects: Counter,
    pub connects: Counter,
    pub errors: Counter,
    /// Messages that did not decode, by subject kind (`events`, `state`, ...).
    pub decode_errors: Family<Vec<(String, String)>, Counter>,
    /// Limits the log lines about undecodable messages.
    pub decode_log: std::sync::Arc<LogThrottle>,
}

/// Lets one log line through per interval (default 1 s) and counts the
/// ones it holds back.
#[derive(Debug)]
pub struct LogThrottle {
    interval_ms: u64,
    /// When the last line went out, ms since the throttle's start + 1 (0: never).
    last: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
    start: std::time::Instant,
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new(Duration::from_secs(1))
    }
}

impl LogThrottle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            last: Default::default(),
            suppressed: Default::default(),
            start: std::time::Instant::now(),
        }
    }

    /// Whether to log now; if so, how many lines were held back since the last one.
    pub fn allow(&self) -> Option<u64> {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.allow_at(now.saturating_add(1))
    }

    fn allow_at(&self, now: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.last.load(Relaxed);
        let due = last == 0 || now >= last.saturating_add(self.interval_ms);
        if due
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

impl BusStats {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "tether_bus_slow_consumer",
            "NATS slow-consumer events (messages dropped by the client)",
            self.slow_consumer.clone(),
        );
        registry.register(
            "tether_bus_disconnects",
            "NATS disconnections",
            self.disconnects.clone(),
        );
        registry.register(
            "tether_bus_connects",
            "NATS (re)connections",
            self.connects.clone(),
        );
        registry.register(
            "tether_bus_errors",
            "NATS client and server errors",
            self.errors.clone(),
        );
        registry.register(
            "tether_bus_decode_errors",
            "Bus messages that failed to decode and were dropped",
            self.decode_errors.clone(),
        );
    }

    pub fn count_decode_error(&self, kind: &str) {
        self.decode_errors
            .get_or_create(&vec![("kind".to_owned(), kind.to_owned())])
            .inc();
    }
}

/// Connects to NATS without credentials beyond those in the URL (see [`connect_with`]).
pub async fn connect(config: &BusConfig) -> Result<(async_nats::Client, BusStats), ConnectFailure> {
    connect_with(config, &BusAuth::default()).await
}

/// Connects to NATS. Returns at once: when the server is not up yet the client
/// keeps retrying in the background (`retry_on_initial_connect`), publishes are
/// buffered and requests fail or time out, which callers treat as "bus down".
/// Authentication failures are retried the same way (and logged), so a
/// service with wrong credentials stays up but never becomes ready.
pub async fn connect_with(
    config: &BusConfig,
    auth: &BusAuth,
) -> Result<(async_nats::Client, BusStats), ConnectFailure> {
    let stats = BusStats::default();
    let events = stats.clone();
    let from_url = split_url_auth(&config.url);
    if from_url.urls.is_empty() {
        return Err(ConnectFailure::Url {
            url: config.url.clone(),
            reason: "no server".into(),
        });
    }
    let mut options = async_nats::ConnectOptions::new();
    if let (Some(user), Some(password)) = (&auth.user, &auth.password) {
        options = options.user_and_password(user.clone(), password.clone());
    } else if let Some(token) = &auth.token {
        options = options.token(token.clone());
    } else if let Some(seed) = &auth.nkey_seed {
        options = options.nkey(seed.trim().to_owned());
    } else if let Some(path) = &auth.creds_file {
        let creds = std::fs::read_to_string(path).map_err(|source| ConnectFailure::Creds {
            path: path.display().to_string(),
            source,
        })?;
        options = options
            .credentials(&creds)
            .map_err(|source| ConnectFailure::Creds {
                path: path.display().to_string(),
                source,
            })?;
    } else {
        match (from_url.user, from_url.password) {
            (Some(u), Some(p)) => options = options.user_and_password(u, p),
            (Some(token), None) => options = options.token(token),
            _ => {}
        }
    }
    if let Some(ca) = &auth.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    match (&auth.tls_cert, &auth.tls_key) {
        (Some(cert), Some(key)) => {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        (None, None) => {}
        _ => return Err(ConnectFailure::HalfClientCert),
    }
    let tls = auth.tls_required
        || auth.tls_ca.is_some()
        || auth.tls_cert.is_some()
        || from_url.urls.iter().any(|u| u.starts_with("tls://"));
    if tls {
        options = options.require_tls(true);
    }
    let client = options
        .name(&config.name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|attempts| {
            // 0, 50 ms, 100 ms, ... capped at 1 s: quick to come back after a blip.
            Duration::from_millis((attempts as u64 * 50).min(1000))
        })
        .event_callback(move |event| {
            let stats = events.clone();
            async move {
                use async_nats::Event;
                match event {
                    Event::SlowConsumer(sid) => {
                        stats.slow_consumer.inc();
                        tracing::warn!(sid, "NATS subscription fell behind: messages dropped");
                    }
                    Event::Disconnected => {
                        stats.disconnects.inc();
                        tracing::warn!("NATS disconnected");
                    }
                    Event::Connected => {
                        stats.connects.inc();
                        tracing::info!("NATS connected");
                    }
                    Event::ServerError(err) => {
                        stats.errors.inc();
                        tracing::warn!(%err, "NATS server error");
                    }
                    Event::ClientError(err) => {
                        stats.errors.inc();
                        tracing::warn!(%err, "NATS client error");
                    }
                    other => tracing::info!(event = %other, "NATS event"),
                }
            }
        })
        // Each server of the list parsed on its own (the client reads one
        // string as one URL).
        .connect(from_url.urls.as_slice())
        .await?;
    Ok((client, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_are_split_off() {
        let a = split_url_auth("nats://alice:s%40cret@h1:4222,nats://h2:4222");
        assert_eq!(a.urls.join(","), "nats://h1:4222,nats://h2:4222");
        assert_eq!(a.user.as_deref(), Some("alice"));
        assert_eq!(a.password.as_deref(), Some("s@cret"));
        let t = split_url_auth("tls://tok@h1:4222");
        assert_eq!(t.urls.join(","), "tls://h1:4222");
        assert_eq!((t.user.as_deref(), t.password), (Some("tok"), None));
        let n = split_url_auth("h1:4222");
        assert_eq!((n.urls.join(","), n.user), ("h1:4222".to_owned(), None));
    }

    #[test]
    fn the_log_throttle_lets_one_line_through_per_interval() {
        let t = LogThrottle::new(Duration::from_millis(1000));
        assert_eq!(t.allow_at(1), Some(0));
        for _ in 0..1858 {
            assert_eq!(t.allow_at(500), None);
        }
        assert_eq!(t.allow_at(1001), Some(1858));
        assert_eq!(t.allow_at(1002), None);
    }

    #[test]
    fn secrets_do_not_print() {
        let a = BusAuth {
            user: Some("u".into()),
            password: Some("hunter2".into()),
            token: Some("tok".into()),
            ..BusAuth::default()
        };
        let text = format!("{a:?}");
        assert!(!text.contains("hunter2") && !text.contains("tok\""));
    }
}
