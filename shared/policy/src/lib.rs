//! The scheduling policy, pure: no I/O, no clock reads — time and load are inputs.
//!
//! Module map:
//! - [`priority`]  — the queue level of a call from its session's attained
//!   service (ATLAS or PLAS), with anti-starvation.
//! - [`placement`] — which engine runs a call: affinity under bounded load,
//!   else least loaded; rendezvous hashing for the load-blind fallback.
//! - [`strategy`]  — Tether's strategy (affinity weighed by cache freshness,
//!   prefix matches, bounded load) and the baselines it is measured against.
//!
//! `docs/policy.md` gives the math, the defaults and the reasons for them.
#![forbid(unsafe_code)]

pub mod placement;
pub mod priority;
pub mod strategy;

pub use placement::{
    EngineLoad, Placement, PlacementConfig, least_loaded, load_bound, place, rendezvous,
};
pub use priority::{PriorityConfig, PriorityMode, SessionService, call_level, level};
pub use strategy::{Affinity, CacheAwareConfig, Inputs, Strategy, choose, freshness};
