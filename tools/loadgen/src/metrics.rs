//! The engines' prefix-cache counters, read from their Prometheus `/metrics`
//! at the start and the end of a run: the fleet hit rate is
//! Σ Δ`vllm:prefix_cache_hits` ÷ Σ Δ`vllm:prefix_cache_queries` (both in
//! tokens), summed over label sets and over the engines read both times.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use std::time::Duration;

use crate::client::HttpClient;

pub const HITS: &str = "vllm:prefix_cache_hits";
pub const QUERIES: &str = "vllm:prefix_cache_queries";

/// Sums a counter over its label sets in Prometheus text. Samples named
/// `name` or `name_total` count (not `name_created`); an optional timestamp
/// after the value is ignored. The text is read by the shared parser
/// ([`tether_fleet::prom`]).
pub fn counter(text: &str, name: &str) -> f64 {
    tether_fleet::prom::sum(text, name, &[])
}

/// One engine's (hits, queries) now, or `None` if it could not be read.
pub async fn read(client: &HttpClient, engine: &str) -> Option<(f64, f64)> {
    let url = format!("{}/metrics", engine.trim_end_matches('/'));
    let req = http::Request::get(url).body(Full::new(Bytes::new())).ok()?;
    let fetch = async {
        let resp = client.request(req).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.into_body().collect().await.ok().map(|b| b.to_bytes())
    };
    let body = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .ok()??;
    let text = String::from_utf8_lossy(&body);
    Some((counter(&text, HITS), counter(&text, QUERIES)))
}

/// Every engine's counters, in order.
pub async fn read_all(client: &HttpClient, engines: &[String]) -> Vec<Option<(f64, f64)>> {
    futures::future::join_all(engines.iter().map(|e| read(client, e))).await
}

/// The run's cache figures from the counters before and after it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct CacheDelta {
    pub hits: f64,
    pub queries: f64,
    /// Engines read both times.
    pub engines: usize,
}

impl CacheDelta {
    pub fn between(before: &[Option<(f64, f64)>], after: &[Option<(f64, f64)>]) -> Self {
        let mut d = Self::default();
        for (b, a) in before.iter().zip(after) {
            if let (Some((bh, bq)), Some((ah, aq))) = (b, a) {
                // A restarted engine (counters went down) counts from zero.
                let (bh, bq) = if ah < bh || aq < bq {
                    (0.0, 0.0)
                } else {
                    (*bh, *bq)
                };
                d.hits += ah - bh;
                d.queries += aq - bq;
                d.engines += 1;
            }
        }
        d
    }

    pub fn hit_rate(&self) -> Option<f64> {
        (self.queries > 0.0).then(|| self.hits / self.queries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_sum_label_sets() {
        let text = "# HELP vllm:prefix_cache_hits Prefix cache hits, in tokens.\n\
            # TYPE vllm:prefix_cache_hits counter\n\
            vllm:prefix_cache_hits_total{model_name=\"m\",engine=\"a\"} 3\n\
            vllm:prefix_cache_hits_total{model_name=\"m b}\",engine=\"b\"} 4.5 1700000000000\n\
            vllm:prefix_cache_hits_created{model_name=\"m\"} 1.7e9\n\
            vllm:prefix_cache_hits_other 100\n\
            vllm:prefix_cache_queries 10\n\
            vllm:prefix_cache_queries_total{engine=\"b\"} 2e1\n";
        assert_eq!(counter(text, HITS), 7.5);
        assert_eq!(counter(text, QUERIES), 30.0);
        assert_eq!(counter(text, "absent"), 0.0);
        assert_eq!(counter("x{a=\"unterminated 5\n", "x"), 0.0);
    }

    #[test]
    fn deltas_over_engines() {
        let before = [Some((10.0, 100.0)), None, Some((50.0, 60.0))];
        let after = [Some((30.0, 140.0)), Some((5.0, 5.0)), Some((2.0, 4.0))];
        let d = CacheDelta::between(&before, &after);
        // Engine 1 unread at the start: left out; engine 2 restarted.
        assert_eq!((d.hits, d.queries, d.engines), (22.0, 44.0, 2));
        assert_eq!(d.hit_rate(), Some(0.5));
        assert_eq!(CacheDelta::default().hit_rate(), None);
    }
}
