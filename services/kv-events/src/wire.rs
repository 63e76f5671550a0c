//! vLLM's KV cache events on the wire (`vllm/distributed/kv_events.py`),
//! decoded into the project's [`KvEvent`]s.
//!
//! A ZMQ message is three frames: topic, sequence number (8 bytes,
//! big-endian), msgpack payload. The payload is a batch
//! `[ts, [event, …], data_parallel_rank]` (msgspec `array_like`; a map with
//! those keys is accepted too). Each event is tagged with its class name,
//! either as a positional array (`["BlockStored", block_hashes,
//! parent_block_hash, token_ids, block_size, lora_id, medium, lora_name,
//! …]`, vLLM up to its map layout) or as a map whose `type` key is the tag
//! (vLLM PR #42892 and later). Unknown event tags and fields are skipped, so
//! that newer engines still decode. Block hashes are vLLM's
//! `ExternalBlockHash`: an integer, or bytes of which the last 8, big-endian,
//! are used (vLLM's own integer form keeps the low 64 bits).
//!
//! Only events about the GPU cache (`medium` nil or `"GPU"`) are kept: an
//! offloaded (CPU, disk) block does not make a prompt's prefill free.

use rmpv::Value;
use tether_protocol::KvEvent;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WireError {
    #[error("expected 3 frames (topic, seq, payload), got {0}")]
    Frames(usize),
    #[error("the sequence frame is {0} bytes, not 8")]
    Seq(usize),
    #[error("payload is not msgpack: {0}")]
    Msgpack(String),
    #[error("payload is not an event batch: {0}")]
    Shape(&'static str),
}

/// A decoded batch.
#[derive(Debug, PartialEq)]
pub struct Batch {
    /// Unix seconds.
    pub ts: f64,
    pub events: Vec<KvEvent>,
    /// Events skipped: unknown tags, other media.
    pub skipped: usize,
}

/// The 8-byte big-endian sequence frame (signed, as vLLM's end marker is −1).
pub fn seq_of(frame: &[u8]) -> Result<i64, WireError> {
    let bytes: [u8; 8] = frame.try_into().map_err(|_| WireError::Seq(frame.len()))?;
    Ok(i64::from_be_bytes(bytes))
}

/// The largest payload decoded (vLLM batches one engine step: far less).
pub const MAX_PAYLOAD: usize = 64 << 20;

/// Decodes one payload.
pub fn decode_batch(payload: &[u8]) -> Result<Batch, WireError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(WireError::Shape("payload over 64 MiB"));
    }
    let value = rmpv::decode::read_value(&mut &payload[..])
        .map_err(|e| WireError::Msgpack(e.to_string()))?;
    let (ts, events) = match &value {
        Value::Array(a) if a.len() >= 2 => (&a[0], &a[1]),
        Value::Map(m) => (
            field(m, "ts").ok_or(WireError::Shape("no ts"))?,
            field(m, "events").ok_or(WireError::Shape("no events"))?,
        ),
        _ => return Err(WireError::Shape("not [ts, events, rank]")),
    };
    let ts = ts.as_f64().ok_or(WireError::Shape("ts is not a number"))?;
    let events = events
        .as_array()
        .ok_or(WireError::Shape("events is not an array"))?;
    let mut out = Vec::with_capacity(events.len());
    let mut skipped = 0;
    for e in events {
        match event(e)? {
            Some(ev) => out.push(ev),
            None => skipped += 1,
        }
    }
    Ok(Batch {
        ts,
        events: out,
        skipped,
    })
}

fn field<'a>(m: &'a [(Value, Value)], name: &str) -> Option<&'a Value> {
    m.iter()
        .find(|(k, _)| k.as_str() == Some(name))
        .map(|(_, v)| v)
}

/// An event's tag and its fields by name.
struct Fields<'a> {
    tag: &'a str,
    array: Option<&'a [Value]>,
    map: Option<&'a [(Value, Value)]>,
}

impl<'a> Fields<'a> {
    /// The field `name`, at `index` (after the tag) in the array layout.
    fn get(&self, name: &str, index: usize) -> Option<&'a Value> {
        match (self.array, self.map) {
            (Some(a), _) => a.get(index + 1),
            (_, Some(m)) => field(m, name),
            _ => None,
        }
    }
}

fn event(v: &Value) -> Result<Option<KvEvent>, WireError> {
    let f = match v {
        Value::Array(a) => Fields {
            tag: a
                .first()
                .and_then(Value::as_str)
                .ok_or(WireError::Shape("event has no tag"))?,
            array: Some(a),
            map: None,
        },
        Value::Map(m) => Fields {
            tag: field(m, "type")
                .and_then(Value::as_str)
                .ok_or(WireError::Shape("event has no type"))?,
            array: None,
            map: Some(m),
        },
        _ => return Err(WireError::Shape("event is neither array nor map")),
    };
    let gpu = |medium: Option<&Value>| match medium {
        None | Some(Value::Nil) => true,
        Some(m) => m.as_str() == Some("GPU"),
    };
    Ok(match f.tag {
        "BlockStored" => {
            if !gpu(f.get("medium", 5)) {
                return Ok(None);
            }
            let hashes = hashes(f.get("block_hashes", 0))?;
            let parent = match f.get("parent_block_hash", 1) {
                None | Some(Value::Nil) => None,
                Some(h) => Some(hash(h)?),
            };
            let block_size = f
                .get("block_size", 3)
                .and_then(Value::as_u64)
                .and_then(|b| u32::try_from(b).ok())
                .ok_or(WireError::Shape("block_size is not a u32"))?;
            Some(KvEvent::Stored {
                hashes,
                parent,
                block_size,
            })
        }
        "BlockRemoved" => {
            if !gpu(f.get("medium", 1)) {
                return Ok(None);
            }
            Some(KvEvent::Removed {
                hashes: hashes(f.get("block_hashes", 0))?,
            })
        }
        "AllBlocksCleared" => Some(KvEvent::Cleared),
        _ => None,
    })
}

fn hashes(v: Option<&Value>) -> Result<Vec<u64>, WireError> {
    v.and_then(Value::as_array)
        .ok_or(WireError::Shape("block_hashes is not an array"))?
        .iter()
        .map(hash)
        .collect()
}

fn hash(v: &Value) -> Result<u64, WireError> {
    match v {
        Value::Integer(i) => i
            .as_u64()
            // A negative integer keeps its two's-complement bits.
            .or_else(|| i.as_i64().map(|x| x as u64))
            .ok_or(WireError::Shape("hash out of range")),
        Value::Binary(b) => {
            let tail = &b[b.len().saturating_sub(8)..];
            let mut buf = [0u8; 8];
            buf[8 - tail.len()..].copy_from_slice(tail);
            Ok(u64::from_be_bytes(buf))
        }
        _ => Err(WireError::Shape("a block hash is neither int nor bytes")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: Value) -> Vec<u8> {
        let mut b = Vec::new();
        rmpv::encode::write_value(&mut b, &v).unwrap();
        b
    }

    fn s(x: &str) -> Value {
        Value::from(x)
    }

    #[test]
    fn array_and_map_layouts_decode_alike() {
        let array = Value::Array(vec![
            Value::F64(2.5),
            Value::Array(vec![
                Value::Array(vec![
                    s("BlockStored"),
                    Value::Array(vec![Value::from(1u64), Value::from(u64::MAX)]),
                    Value::Nil,
                    Value::Array(vec![Value::from(7u64)]),
                    Value::from(16u64),
                    Value::Nil,
                    s("GPU"),
                    Value::Nil,
                ]),
                Value::Array(vec![
                    s("BlockRemoved"),
                    Value::Array(vec![Value::from(1u64)]),
                    s("GPU"),
                ]),
                Value::Array(vec![s("AllBlocksCleared")]),
            ]),
            Value::from(0u64),
        ]);
        let map = Value::Array(vec![
            Value::F64(2.5),
            Value::Array(vec![
                Value::Map(vec![
                    (s("type"), s("BlockStored")),
                    (
                        s("block_hashes"),
                        Value::Array(vec![
                            Value::Binary(vec![0xff, 0, 0, 0, 0, 0, 0, 0, 1]),
                            Value::from(-1i64),
                        ]),
                    ),
                    (s("parent_block_hash"), Value::Nil),
                    (s("token_ids"), Value::Array(vec![])),
                    (s("block_size"), Value::from(16u64)),
                    (s("medium"), s("GPU")),
                    (s("group_idx"), Value::from(0u64)),
                ]),
                Value::Map(vec![
                    (s("type"), s("BlockRemoved")),
                    (s("block_hashes"), Value::Array(vec![Value::from(1u64)])),
                ]),
                Value::Map(vec![(s("type"), s("AllBlocksCleared"))]),
                Value::Map(vec![(s("type"), s("SomethingNew"))]),
            ]),
            Value::from(0u64),
        ]);
        let a = decode_batch(&enc(array)).unwrap();
        let m = decode_batch(&enc(map)).unwrap();
        assert_eq!(a.ts, 2.5);
        assert_eq!(a.events, m.events);
        assert_eq!(
            a.events[0],
            KvEvent::Stored {
                hashes: vec![1, u64::MAX],
                parent: None,
                block_size: 16
            }
        );
        assert_eq!(m.skipped, 1);
    }

    #[test]
    fn other_media_are_skipped_and_garbage_is_an_error() {
        let cpu = Value::Array(vec![
            Value::F64(1.0),
            Value::Array(vec![Value::Array(vec![
                s("BlockRemoved"),
                Value::Array(vec![Value::from(1u64)]),
                s("CPU"),
            ])]),
        ]);
        let b = decode_batch(&enc(cpu)).unwrap();
        assert!(b.events.is_empty());
        assert_eq!(b.skipped, 1);
        assert!(decode_batch(&[0xc1]).is_err());
        assert!(decode_batch(&enc(Value::from(3u64))).is_err());
        assert!(decode_batch(&enc(Value::Array(vec![Value::F64(1.0), s("x")]))).is_err());
        assert_eq!(seq_of(&(-1i64).to_be_bytes()), Ok(-1));
        assert_eq!(seq_of(&[1, 2]), Err(WireError::Seq(2)));
    }
}
