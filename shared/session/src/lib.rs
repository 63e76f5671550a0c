//! The session model, pure: no I/O, no clock — time is an argument.
//!
//! Module map:
//! - [`state`] — one session's state and the ATLAS/PLAS update rules.
//! - [`table`] — a shard's sessions: apply events, bound memory, evict idle sessions.
#![forbid(unsafe_code)]

pub mod state;
pub mod table;

pub use state::SessionState;
pub use table::{Applied, SessionTable, TableLimits};
