//! A shard's snapshot: its sessions and the events-stream sequence they
//! reflect, so that a restarted shard loads it and replays the stream from
//! the next sequence.
//!
//! Format (documented in `docs/protocol.md`): the magic bytes `TSNP`, the
//! snapshot format version (`u16`, little-endian), then [`ShardSnapshot`] in
//! bincode 2 standard configuration (serde representation), decoded under a
//! size limit with no trailing bytes.

use serde::{Deserialize, Serialize};
use tether_protocol::SessionHash;
use tether_session::SessionState;

pub const MAGIC: [u8; 4] = *b"TSNP";
/// Bump on any incompatible change to [`ShardSnapshot`] or [`SessionState`].
pub const SNAPSHOT_VERSION: u16 = 1;
/// The largest snapshot the decoder accepts (1 GiB).
pub const MAX_SNAPSHOT_BYTES: usize = 1 << 30;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardSnapshot {
    pub shard: u16,
    /// The shard count when it was taken; a snapshot of another count is ignored.
    pub shards: u16,
    /// The last events-stream sequence applied: replay starts after it.
    pub stream_seq: u64,
    /// The last delta sequence published: the restarted shard continues from
    /// it, so that record versions keep growing across restarts.
    pub delta_seq: u64,
    pub taken_ms: u64,
    pub sessions: Vec<(SessionHash, SessionState)>,
}

/// The same fields, borrowed, for encoding without copying the table.
#[derive(Serialize)]
pub struct ShardSnapshotRef<'a> {
    pub shard: u16,
    pub shards: u16,
    pub stream_seq: u64,
    pub delta_seq: u64,
    pub taken_ms: u64,
    pub sessions: Vec<(SessionHash, &'a SessionState)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("not a snapshot (bad magic bytes)")]
    Magic,
    #[error("snapshot format version {found}; this build reads {SNAPSHOT_VERSION}")]
    Version { found: u16 },
    #[error("snapshot is {0} bytes; the limit is {MAX_SNAPSHOT_BYTES}")]
    TooLarge(usize),
    #[error("{0} trailing bytes after the snapshot")]
    Trailing(usize),
    #[error("could not encode the snapshot: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("could not decode the snapshot: {0}")]
    Decode(#[from] bincode::error::DecodeError),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_SNAPSHOT_BYTES>()
}

pub fn encode(snapshot: &ShardSnapshotRef<'_>) -> Result<Vec<u8>, SnapshotError> {
    let mut out = Vec::with_capacity(64 + snapshot.sessions.len() * 96);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    bincode::serde::encode_into_std_write(snapshot, &mut out, config())?;
    Ok(out)
}

pub fn decode(bytes: &[u8]) -> Result<ShardSnapshot, SnapshotError> {
    if bytes.len() > MAX_SNAPSHOT_BYTES {
        return Err(SnapshotError::TooLarge(bytes.len()));
    }
    let (magic, rest) = bytes.split_at_checked(4).ok_or(SnapshotError::Magic)?;
    if magic != MAGIC {
        return Err(SnapshotError::Magic);
    }
    let (version, body) = rest.split_at_checked(2).ok_or(SnapshotError::Magic)?;
    let found = u16::from_le_bytes([version[0], version[1]]);
    if found != SNAPSHOT_VERSION {
        return Err(SnapshotError::Version { found });
    }
    let (snapshot, used): (ShardSnapshot, usize) =
        bincode::serde::decode_from_slice(body, config())?;
    if used != body.len() {
        return Err(SnapshotError::Trailing(body.len() - used));
    }
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(key: &str) -> SessionState {
        SessionState {
            key: key.into(),
            cst: 1.5,
            attained: 2.5,
            wait: 0.25,
            in_flight: vec![(7, 1000)],
            requests: 3,
            affinity: Some("e1".into()),
            last_active_ms: 1234,
            version: 9,
        }
    }

    #[test]
    fn round_trip() {
        let a = state("a");
        let b = state("b");
        let bytes = encode(&ShardSnapshotRef {
            shard: 2,
            shards: 16,
            stream_seq: 99,
            delta_seq: 12,
            taken_ms: 5,
            sessions: vec![(1, &a), (2, &b)],
        })
        .unwrap();
        assert_eq!(&bytes[..4], b"TSNP");
        let back = decode(&bytes).unwrap();
        assert_eq!(
            back,
            ShardSnapshot {
                shard: 2,
                shards: 16,
                stream_seq: 99,
                delta_seq: 12,
                taken_ms: 5,
                sessions: vec![(1, a), (2, b)],
            }
        );
    }

    #[test]
    fn bad_input_is_refused() {
        let bytes = encode(&ShardSnapshotRef {
            shard: 0,
            shards: 1,
            stream_seq: 0,
            delta_seq: 0,
            taken_ms: 0,
            sessions: vec![],
        })
        .unwrap();
        let mut wrong = bytes.clone();
        wrong[4] = 9;
        assert!(matches!(
            decode(&wrong),
            Err(SnapshotError::Version { found: 9 })
        ));
        assert!(matches!(decode(b"nope"), Err(SnapshotError::Magic)));
        assert!(matches!(decode(b""), Err(SnapshotError::Magic)));
        let mut trailing = bytes;
        trailing.push(0);
        assert!(matches!(decode(&trailing), Err(SnapshotError::Trailing(1))));
    }
}
