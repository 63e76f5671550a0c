//! The HTTP client to engines: HTTP/1.1 with a keep-alive pool per engine and
//! `TCP_NODELAY` (without it, small SSE writes wait on delayed ACKs and a
//! streamed first token can arrive ~40 ms late).

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::{Client, connect::HttpConnector};
use hyper_util::rt::TokioExecutor;
use std::time::Duration;

pub type EngineClient = Client<HttpConnector, Full<Bytes>>;

/// Builds the shared client. Cheap to clone; clones share the pool.
pub fn engine_client() -> EngineClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    connector.set_keepalive(Some(Duration::from_secs(30)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .build(connector)
}
