//! The scheduling policy, pure: no I/O, no clock reads — time and load are inputs.
//!
//! Module map:
//! - [`priority`]  — the queue level of a call from its session's attained
//!   service (ATLAS or PLAS), with anti-starvation.
//! - [`placement`] — which engine runs a call: affinity under bounded load,
//!   else least loaded; rendezvous hashing for the load-blind fallback.
//! - [`strategy`]  — Tether's strategy (prefix matches across sessions,
//!   affinity weighed by cache freshness, bounded load) and the baselines it
//!   is measured against.
//! - [`cost`]      — the service a call received, in estimated engine seconds,
//!   and the prefill a cache hit saves.
//! - [`gate`]      — the gateway queue: per-engine limits, order, starvation
//!   bound, late binding (delay scheduling).
//! - [`capacity`]  — the rule that learns each engine's limit from its signals.
//! - [`config`]    — every knob of the above in one struct, with defaults.
//!
//! `docs/policy.md` gives the math, the defaults and the reasons for them.
#![forbid(unsafe_code)]

pub mod capacity;
pub mod config;
pub mod cost;
pub mod gate;
pub mod placement;
pub mod priority;
pub mod strategy;

pub use capacity::{CapacityConfig, CapacitySignal, next_limit};
pub use config::PolicyConfig;
pub use cost::{CostModel, Work};
pub use gate::{Ask, GateConfig, GateQueue, Grant, Offer};
pub use placement::{
    EngineLoad, FleetSummary, Placement, PlacementConfig, least_loaded, load_bound, rendezvous,
};
pub use priority::{Ordering, PriorityConfig, PriorityMode, SessionService, call_level, starving};
pub use strategy::{Affinity, CacheAwareConfig, Inputs, Strategy, choose, freshness};
