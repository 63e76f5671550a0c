//! The engine fleet as the ingress and the scheduler both know it.
//!
//! Module map:
//! - [`config`] — the fleet file (TOML): each engine's name, URL, models and capabilities.
//! - [`client`] — the pooled HTTP/1.1 client to engines (`TCP_NODELAY`, keep-alive).
//! - [`health`] — active health probing, shared as lock-free flags.
//! - [`scrape`] — the engines' own load from their Prometheus metrics.
//! - [`prom`]   — the Prometheus text-format parser every crate and test shares.
#![forbid(unsafe_code)]

pub mod client;
pub mod config;
pub mod health;
pub mod prom;
pub mod scrape;

pub use client::{EngineClient, engine_client};
pub use config::{EngineConfig, EngineKind, FleetConfig, FleetError};
pub use health::{FleetHealth, HealthConfig, spawn_prober};
pub use scrape::{EngineSample, FleetLoad, metrics_text, scrape, spawn_scraper, tokens_processed};
