//! The wire encoding: a schema version, then the body, both bincode 2
//! (standard config: little-endian, variable-length integers), decoded under a
//! size limit. This module is the only code that names bincode, so the codec
//! can be swapped without touching the services.

use serde::{Serialize, de::DeserializeOwned};

/// The version every message carries. Bump it on any incompatible change and
/// document the change in `docs/protocol.md`.
pub const SCHEMA_VERSION: u16 = 2;

/// The largest message body the decoder will allocate for (4 MiB; NATS's own
/// default payload limit is 1 MiB).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("could not encode message: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("could not decode message: {0}")]
    Decode(#[from] bincode::error::DecodeError),
    #[error("message has schema version {found}; this build speaks {SCHEMA_VERSION}")]
    Version { found: u16 },
    #[error("message is {0} bytes; the limit is {MAX_MESSAGE_BYTES}")]
    TooLarge(usize),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_MESSAGE_BYTES>()
}

/// Encodes `value` with the schema version in front.
pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let mut out = bincode::encode_to_vec(SCHEMA_VERSION, config())?;
    bincode::serde::encode_into_std_write(value, &mut out, config())?;
    Ok(out)
}

/// Decodes a message, checking its version, its size and that nothing trails it.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(CodecError::TooLarge(bytes.len()));
    }
    let (version, used): (u16, usize) = bincode::decode_from_slice(bytes, config())?;
    if version != SCHEMA_VERSION {
        return Err(CodecError::Version { found: version });
    }
    let rest = &bytes[used..];
    let (value, used) = bincode::serde::decode_from_slice(rest, config())?;
    if used != rest.len() {
        return Err(CodecError::Trailing(rest.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::*;
    use proptest::prelude::*;

    fn event() -> RequestEvent {
        RequestEvent {
            call_id: 7,
            session_hash: 42,
            session_key: "s".into(),
            at_ms: 1,
            engine: "e1".into(),
            kind: EventKind::Finished(Finished {
                inherited_cst: 1.0,
                executed: 2.0,
                waited: 0.5,
                wall: 2.5,
                prompt_tokens: 10,
                cached_tokens: 4,
                completion_tokens: 3,
                outcome: Outcome::Ok,
            }),
        }
    }

    #[test]
    fn round_trip() {
        let bytes = encode(&event()).unwrap();
        assert_eq!(decode::<RequestEvent>(&bytes).unwrap(), event());
    }

    #[test]
    fn kv_batch_round_trip() {
        let batch = KvEventBatch {
            engine: "sim-1".into(),
            epoch: 9,
            seq: 1,
            engine_seq: 41,
            at_ms: 5,
            events: vec![
                KvEvent::Stored {
                    hashes: vec![1, 2],
                    parent: None,
                    block_size: 16,
                },
                KvEvent::Removed { hashes: vec![1] },
                KvEvent::Cleared,
                KvEvent::Reset,
            ],
        };
        let bytes = encode(&batch).unwrap();
        assert_eq!(decode::<KvEventBatch>(&bytes).unwrap(), batch);
    }

    #[test]
    fn wrong_version_is_refused() {
        let mut bytes = encode(&event()).unwrap();
        bytes[0] = 9;
        assert!(matches!(
            decode::<RequestEvent>(&bytes),
            Err(CodecError::Version { found: 9 })
        ));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&event()).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<RequestEvent>(&bytes),
            Err(CodecError::Trailing(1))
        ));
    }

    #[test]
    fn huge_length_prefix_does_not_allocate() {
        // version 1, then a string length claiming ~2^60 bytes.
        let bytes = [
            1u8, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x0f, 0xff,
        ];
        assert!(decode::<RequestEvent>(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode::<RequestEvent>(&bytes);
            let _ = decode::<StateDelta>(&bytes);
            let _ = decode::<RouteRequest>(&bytes);
            let _ = decode::<KvEventBatch>(&bytes);
        }
    }
}
