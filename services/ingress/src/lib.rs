//! The ingress: Tether's OpenAI-compatible HTTP front door.
//!
//! A call's path: [`handlers`] reads and checks the body ([`request`]),
//! finds the session key ([`session`]), asks the scheduler where and how
//! urgently to run it, or decides alone when the scheduler cannot answer
//! ([`routing`]), sends it to the engine and streams the answer back
//! ([`proxy`]) while [`tracker`] measures it; the call's lifecycle events go
//! out on the bus off the request path ([`events`]).
//!
//! Module map:
//! - [`admission`] — the gateway queue, live: limits, order, starvation bound, late binding.
//! - [`dispatch`] — running a routed call: a slot at the gateway, the engine, retries before the first byte.
//! - [`auth`]     — optional API keys (hashed), one tenant per key.
//! - [`affinity`] — the engine that last served each recent session (for the fallback route).
//! - [`breaker`]  — the circuit breaker: engines whose calls keep failing are ejected.
//! - [`stall`]    — the stall watchdog: engines that hold calls while their token counters stand still.
//! - [`capacity`] — capacity control: engine limits learned from engine metrics.
//! - [`config`]   — flags, environment and defaults.
//! - [`errors`]   — OpenAI-style JSON errors.
//! - [`request`]  — the request body, parsed once; what the ingress reads and changes in it.
//! - [`session`]  — the session key: header, body field or implicit.
//! - [`programs`] — which sessions run calls in parallel (agent programs).
//! - [`routing`]  — route requests to the scheduler and the local fallback.
//! - [`tracker`]  — a response body wrapper that measures the call and reports its end.
//! - [`proxy`]    — forwarding to the engine.
//! - [`events`]   — the lifecycle-event publisher.
//! - [`metrics`]  — the Prometheus metrics.
//! - [`handlers`] — the HTTP routes.
//! - [`server`]   — the HTTP server with header-read and idle timeouts.
//! - [`service`]  — wiring and start-up.
#![forbid(unsafe_code)]

pub mod admission;
pub mod affinity;
pub mod auth;
pub mod breaker;
pub mod capacity;
pub mod config;
pub mod dispatch;
pub mod errors;
pub mod events;
pub mod handlers;
pub mod metrics;
pub mod programs;
pub mod proxy;
pub mod request;
pub mod routing;
pub mod server;
pub mod service;
pub mod session;
pub mod stall;
pub mod tracker;

pub use config::Config;
pub use service::{Running, start, start_with_fleet};
