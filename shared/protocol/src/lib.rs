//! Tether's wire contract, shared by every service and by anyone who wants to
//! extend the system by subscribing to its subjects.
//!
//! Module map:
//! - [`hash`]     — the stable 64-bit hash used for session keys, shards and block chains.
//! - [`key`]      — session keys: validation and the implicit-key derivation.
//! - [`subjects`] — every NATS subject, under one configurable prefix.
//! - [`messages`] — the payload types (serde), one per subject.
//! - [`codec`]    — the one place that knows the wire encoding (bincode 2) and the
//!   schema version; swap the codec here and nowhere else.
#![forbid(unsafe_code)]

pub mod codec;
pub mod hash;
pub mod key;
pub mod messages;
pub mod subjects;

pub use codec::{CodecError, SCHEMA_VERSION, decode, encode};
pub use hash::{now_ms, prompt_blocks, random_u64, shard_of, sim_token_blocks, stable_hash};
pub use key::{KeyError, MAX_KEY_LEN, SessionKey};
pub use messages::*;
pub use subjects::Subjects;
