//! Payload types. Each is the body of one subject (see [`crate::Subjects`]);
//! the codec prefixes it with the schema version.
//!
//! Units, everywhere: *service* and *wait* are estimated seconds (`f64`), see
//! `docs/policy.md` for how service is measured; timestamps are milliseconds
//! since the Unix epoch (`u64`).

use serde::{Deserialize, Serialize};

/// A call's identity, unique per ingress process (random base + counter).
pub type CallId = u64;
/// `stable_hash` of the session key.
pub type SessionHash = u64;

/// One lifecycle event of one call, published by the ingress on the session's
/// shard subject.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestEvent {
    pub call_id: CallId,
    pub session_hash: SessionHash,
    /// The session key as used (validated, ≤ 256 bytes).
    pub session_key: String,
    /// When the event happened, ms since the Unix epoch.
    pub at_ms: u64,
    /// The engine the call went to (its configured name).
    pub engine: String,
    pub kind: EventKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum EventKind {
    /// The call was sent to `engine`. `inherited_cst` is the session's
    /// critical-path service when the call was admitted (ATLAS's `h`).
    Dispatched { inherited_cst: f64, level: u8 },
    /// The call ended (well or not).
    Finished(Finished),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Finished {
    /// ATLAS's `h`, repeated so that the event stands alone.
    pub inherited_cst: f64,
    /// Estimated service the call received (seconds of engine work).
    pub executed: f64,
    /// Time the call waited before it was dispatched (seconds).
    pub waited: f64,
    /// Wall time from dispatch to the last byte (seconds).
    pub wall: f64,
    pub prompt_tokens: u32,
    /// Prompt tokens the engine served from its prefix cache, when it says.
    pub cached_tokens: u32,
    pub completion_tokens: u32,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Ok,
    /// The engine answered with an error status or broke the stream.
    EngineError,
    /// The client went away before the answer was complete (or while the
    /// call waited for a slot).
    Cancelled,
    /// The call was refused before dispatch (the engine's queue was full).
    Refused,
}

/// The state of one session as the session-state shard holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub hash: SessionHash,
    /// The shard sequence number of the last change to this session; replicas
    /// keep the record with the higher version, so that deltas and snapshot
    /// pages can be merged in any order.
    pub version: u64,
    /// Critical-path service (ATLAS), seconds.
    pub cst: f64,
    /// Total attained service (PLAS), seconds.
    pub attained: f64,
    /// Total wait, seconds.
    pub wait: f64,
    pub in_flight: u32,
    pub requests: u64,
    /// The engine that ran the session's last call.
    pub affinity: Option<String>,
    pub last_active_ms: u64,
}

/// A batch of changes to one shard, published on `<p>.state.<shard>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateDelta {
    pub shard: u16,
    /// Random per shard actor start; a new epoch means the shard restarted and
    /// replicas must resynchronise.
    pub epoch: u64,
    /// 1, 2, 3, … within an epoch; a gap means a lost delta.
    pub seq: u64,
    pub updated: Vec<SessionRecord>,
    pub evicted: Vec<SessionHash>,
}

/// Asks a shard for a page of its sessions, ordered by hash.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub shard: u16,
    /// Return sessions with a hash strictly greater than this (None: from the start).
    pub after: Option<SessionHash>,
    pub limit: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SnapshotPage {
    pub shard: u16,
    pub epoch: u64,
    /// The shard's sequence number when the page was taken.
    pub seq: u64,
    pub sessions: Vec<SessionRecord>,
    /// Pass as `after` to get the next page; None when this is the last.
    pub next: Option<SessionHash>,
}

/// Asks a shard for one session.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionQuery {
    pub session_key: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    pub session_key: String,
    pub shard: u16,
    pub record: Option<SessionRecord>,
    /// Calls dispatched and not yet finished.
    pub in_flight_calls: Vec<CallId>,
}

/// Asks the scheduler where and how urgently to run a call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteRequest {
    pub call_id: CallId,
    pub session_hash: SessionHash,
    pub model: String,
    /// Estimated prompt tokens (bytes / 4 when unknown).
    pub prompt_tokens: u32,
    /// Chained hashes of the prompt's text blocks (see `docs/policy.md`).
    pub block_hashes: Vec<u64>,
    /// Engines the ingress can reach and believes healthy (names); empty means
    /// "no opinion".
    pub candidates: Vec<String>,
    /// The session is an agent program: the call carried one of the
    /// ingress's `--program-headers`, or the ingress has seen the session
    /// run calls in parallel.
    pub program: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouteDecision {
    pub call_id: CallId,
    pub engine: String,
    /// Queue level, 0 most urgent.
    pub level: u8,
    /// The session's critical-path service at admission (ATLAS's `h`).
    pub inherited_cst: f64,
    /// The service the level was computed from (critical-path under ATLAS,
    /// total under PLAS), seconds: the gateway queue's starvation bound uses it.
    pub service: f64,
    /// Seconds of prefill the call's cache on `engine` is estimated to save:
    /// the gateway holds the call for `engine` at most this long before any
    /// engine with room will do (late binding). Infinite: never move it.
    pub bind_delay: f64,
    pub reason: RouteReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RouteReason {
    /// Kept on the engine that holds the session's cache.
    Affinity,
    /// Affinity engine overloaded; moved to the least-loaded engine.
    Rebalanced,
    /// No (fresh) affinity: least-loaded engine.
    LeastLoaded,
    /// Best prefix-cache match.
    PrefixMatch,
    /// A load-blind baseline (round-robin, session hash).
    Baseline,
    /// The ingress decided alone (scheduler unreachable).
    Fallback,
}

impl RouteReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Affinity => "affinity",
            Self::Rebalanced => "rebalanced",
            Self::LeastLoaded => "least-loaded",
            Self::PrefixMatch => "prefix-match",
            Self::Baseline => "baseline",
            Self::Fallback => "fallback",
        }
    }
}

/// A route request the scheduler could not answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RouteReply {
    Decision(RouteDecision),
    /// No engine can take the call (none healthy, none serves the model).
    NoEngine {
        reason: String,
    },
}

/// What one engine's KV cache did, relayed from the engine's own KV cache
/// events (vLLM's `--kv-events-config` ZMQ publisher) by `tether-kv-events`
/// on `<p>.kv.<engine>`. One message per engine batch (one engine step).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvEventBatch {
    /// The engine (its configured name).
    pub engine: String,
    /// Random per relay stream (subscriber start or reconnect): a new epoch
    /// means the receiver must forget what it knew of the engine.
    pub epoch: u64,
    /// 1, 2, 3, … within an epoch; a gap means lost messages.
    pub seq: u64,
    /// The engine's own batch sequence number (0 for a relay-made reset).
    pub engine_seq: u64,
    /// When the engine made the batch, ms since the Unix epoch.
    pub at_ms: u64,
    pub events: Vec<KvEvent>,
}

/// One KV cache event. Block hashes are the engine's own (vLLM's
/// `ExternalBlockHash`: ints as they come, byte strings as their last 8
/// bytes big-endian, which is vLLM's own int form).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum KvEvent {
    /// Full blocks now cached, in chain order; `parent` is the block before
    /// the first (None: the first starts a prompt).
    Stored {
        hashes: Vec<u64>,
        parent: Option<u64>,
        block_size: u32,
    },
    /// Blocks evicted.
    Removed { hashes: Vec<u64> },
    /// The engine dropped its whole prefix cache (vLLM `AllBlocksCleared`).
    Cleared,
    /// The relay lost track of the engine (a sequence gap it could not
    /// replay, or the engine restarted): forget everything it held.
    Reset,
}

/// Asks the KV events relay for the blocks one engine holds, in hash order
/// (a new scheduler replica starts from it rather than from empty).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvSnapshotRequest {
    pub engine: String,
    /// Blocks with a hash strictly greater than this (None: from the start,
    /// which also takes a new snapshot; later pages come from that one).
    pub after: Option<u64>,
    pub limit: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvSnapshotPage {
    pub engine: String,
    /// The relay stream's epoch and the `seq` of the last batch the
    /// snapshot includes (0: none yet); every page of one snapshot has the
    /// same. Batches up to `seq` are in it; apply those after.
    pub epoch: u64,
    pub seq: u64,
    /// `(hash, parent)`, parent 0 when none or unknown.
    pub blocks: Vec<(u64, u64)>,
    /// Pass as `after` for the next page; None on the last.
    pub next: Option<u64>,
}
