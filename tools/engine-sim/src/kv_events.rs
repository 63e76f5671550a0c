//! KV cache events, published as vLLM publishes them (its
//! `ZmqEventPublisher` in `vllm/distributed/kv_events.py`), so that a
//! router that reads vLLM's events reads engine-sim's too:
//!
//! - a ZMQ PUB socket sends one message per engine step that changed the
//!   cache, three frames: `topic`, the batch's sequence number (8 bytes,
//!   big-endian, 0, 1, 2, … from start), the msgpack payload;
//! - the payload is a batch `[ts, [event, …], data_parallel_rank]` (a
//!   positional array; `ts` is Unix seconds as a float, the rank is 0);
//! - each event is tagged by its class name, laid out as a positional
//!   array (`--kv-events-format array`, vLLM's layout up to its map change)
//!   or as a map with a `type` key (`map`):
//!   `BlockStored(block_hashes, parent_block_hash, token_ids, block_size,
//!   lora_id, medium, lora_name)`, `BlockRemoved(block_hashes, medium)`,
//!   `AllBlocksCleared()`; hashes are unsigned 64-bit integers (vLLM's
//!   integer `ExternalBlockHash`), `medium` is `"GPU"`, LoRA fields nil;
//! - an optional ZMQ ROUTER socket answers replay requests: a client (a
//!   DEALER) sends `["", start_seq (8 bytes, big-endian)]` and receives, for
//!   every buffered batch with a sequence number at or after it,
//!   `["", seq, payload]`, then `["", -1 (8 bytes), ""]`.
//!
//! Consecutive stores of one chain in a step (each block's parent is the
//! block before) are sent as one `BlockStored`, as vLLM sends a request's
//! new blocks. The format is documented in `docs/engine-sim.md`.

use bytes::Bytes;
use rmpv::Value;
use std::collections::VecDeque;
use tether_telemetry::Shutdown;
use tokio::sync::mpsc;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::config::{KvEventsFormat, SimConfig};
use crate::kv::CacheEvent;

/// The end-of-replay marker's sequence number.
pub const END_SEQ: i64 = -1;

/// One published batch: when and what.
#[derive(Debug)]
pub struct Batch {
    /// Unix seconds.
    pub ts: f64,
    pub events: Vec<CacheEvent>,
}

/// The msgpack payload of one batch.
pub fn encode_batch(
    ts: f64,
    events: &[CacheEvent],
    block_size: usize,
    format: KvEventsFormat,
) -> Vec<u8> {
    let mut out_events: Vec<Value> = Vec::new();
    let mut i = 0;
    while i < events.len() {
        match &events[i] {
            CacheEvent::Stored {
                hash,
                parent,
                tokens,
            } => {
                let mut hashes = vec![Value::from(*hash)];
                let mut token_ids: Vec<Value> = tokens.iter().map(|t| Value::from(*t)).collect();
                let mut last = *hash;
                while let Some(CacheEvent::Stored {
                    hash,
                    parent: Some(p),
                    tokens,
                }) = events.get(i + 1)
                {
                    if *p != last {
                        break;
                    }
                    hashes.push(Value::from(*hash));
                    token_ids.extend(tokens.iter().map(|t| Value::from(*t)));
                    last = *hash;
                    i += 1;
                }
                out_events.push(event(
                    format,
                    "BlockStored",
                    vec![
                        ("block_hashes", Value::Array(hashes)),
                        ("parent_block_hash", parent.map_or(Value::Nil, Value::from)),
                        ("token_ids", Value::Array(token_ids)),
                        ("block_size", Value::from(block_size as u64)),
                        ("lora_id", Value::Nil),
                        ("medium", Value::from("GPU")),
                        ("lora_name", Value::Nil),
                    ],
                ));
            }
            CacheEvent::Removed { hash } => {
                let mut hashes = vec![Value::from(*hash)];
                while let Some(CacheEvent::Removed { hash }) = events.get(i + 1) {
                    hashes.push(Value::from(*hash));
                    i += 1;
                }
                out_events.push(event(
                    format,
                    "BlockRemoved",
                    vec![
                        ("block_hashes", Value::Array(hashes)),
                        ("medium", Value::from("GPU")),
                    ],
                ));
            }
            CacheEvent::Cleared => out_events.push(event(format, "AllBlocksCleared", vec![])),
        }
        i += 1;
    }
    let batch = Value::Array(vec![
        Value::F64(ts),
        Value::Array(out_events),
        Value::from(0u64),
    ]);
    let mut buf = Vec::new();
    // Writing into a Vec cannot fail.
    let _ = rmpv::encode::write_value(&mut buf, &batch);
    buf
}

fn event(format: KvEventsFormat, tag: &str, fields: Vec<(&str, Value)>) -> Value {
    match format {
        KvEventsFormat::Array => {
            let mut v = vec![Value::from(tag)];
            v.extend(fields.into_iter().map(|(_, f)| f));
            Value::Array(v)
        }
        KvEventsFormat::Map => {
            let mut v = vec![(Value::from("type"), Value::from(tag))];
            v.extend(fields.into_iter().map(|(k, f)| (Value::from(k), f)));
            Value::Map(v)
        }
    }
}

/// vLLM binds when the endpoint has a wildcard host; `*` means every
/// interface, which the ZMQ library here spells `0.0.0.0`.
fn bind_address(endpoint: &str) -> String {
    endpoint.replacen("tcp://*:", "tcp://0.0.0.0:", 1)
}

/// Where the publisher's sockets are bound (ports resolved).
#[derive(Clone, Debug)]
pub struct Bound {
    pub events: String,
    pub replay: Option<String>,
}

/// Binds the sockets the config names and starts the publishing task; the
/// engine task sends it each step's events. None when events are off.
pub async fn start(
    cfg: &SimConfig,
    shutdown: Shutdown,
) -> anyhow::Result<Option<(mpsc::UnboundedSender<Batch>, Bound)>> {
    let Some(endpoint) = &cfg.kv_events_endpoint else {
        return Ok(None);
    };
    let mut publisher = PubSocket::new();
    let events = publisher
        .bind(&bind_address(endpoint))
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind KV events endpoint {endpoint}: {e}"))?;
    let (req_tx, req_rx) = mpsc::channel::<(Bytes, u64)>(64);
    let (replay_tx, replay) = match &cfg.kv_events_replay_endpoint {
        Some(ep) => {
            let mut router = RouterSocket::new();
            let bound = router
                .bind(&bind_address(ep))
                .await
                .map_err(|e| anyhow::anyhow!("cannot bind KV events replay endpoint {ep}: {e}"))?;
            let (send, recv) = router.split();
            tokio::spawn(replay_requests(recv, req_tx, shutdown.clone()));
            (Some(send), Some(bound.to_string()))
        }
        None => (None, None),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let task = Publisher {
        publisher,
        replay: replay_tx,
        topic: Bytes::from(cfg.kv_events_topic.clone().into_bytes()),
        buffer: VecDeque::new(),
        buffer_steps: cfg.kv_events_buffer_steps,
        next_seq: 0,
        block_size: cfg.block_size,
        format: cfg.kv_events_format,
    };
    tokio::spawn(task.run(rx, req_rx, shutdown));
    Ok(Some((
        tx,
        Bound {
            events: events.to_string(),
            replay,
        },
    )))
}

/// Reads replay requests `[identity, "", start_seq]`; malformed ones are
/// logged and dropped, as vLLM does.
async fn replay_requests(
    mut recv: zeromq::RouterRecvHalf,
    out: mpsc::Sender<(Bytes, u64)>,
    shutdown: Shutdown,
) {
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = recv.recv() => m,
        };
        let Ok(msg) = msg else {
            continue;
        };
        let frames = msg.into_vec();
        let [id, _, start] = frames.as_slice() else {
            tracing::warn!(frames = frames.len(), "invalid KV events replay request");
            continue;
        };
        let Ok(start) = <[u8; 8]>::try_from(start.as_ref()) else {
            tracing::warn!("invalid KV events replay start sequence");
            continue;
        };
        if out
            .send((id.clone(), u64::from_be_bytes(start)))
            .await
            .is_err()
        {
            return;
        }
    }
}

struct Publisher {
    publisher: PubSocket,
    replay: Option<zeromq::RouterSendHalf>,
    topic: Bytes,
    buffer: VecDeque<(u64, Bytes)>,
    buffer_steps: usize,
    next_seq: u64,
    block_size: usize,
    format: KvEventsFormat,
}

impl Publisher {
    async fn run(
        mut self,
        mut batches: mpsc::UnboundedReceiver<Batch>,
        mut requests: mpsc::Receiver<(Bytes, u64)>,
        shutdown: Shutdown,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                b = batches.recv() => match b {
                    Some(b) => self.publish(b).await,
                    None => return,
                },
                Some((id, start)) = requests.recv() => self.replay(id, start).await,
            }
        }
    }

    async fn publish(&mut self, batch: Batch) {
        let payload = Bytes::from(encode_batch(
            batch.ts,
            &batch.events,
            self.block_size,
            self.format,
        ));
        let seq = self.next_seq;
        self.next_seq += 1;
        let frames = vec![
            self.topic.clone(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload.clone(),
        ];
        if let Ok(msg) = ZmqMessage::try_from(frames)
            && let Err(e) = self.publisher.send(msg).await
        {
            tracing::warn!(error = %e, seq, "KV events publish failed");
        }
        if self.buffer_steps > 0 {
            if self.buffer.len() >= self.buffer_steps {
                self.buffer.pop_front();
            }
            self.buffer.push_back((seq, payload));
        }
    }

    async fn replay(&mut self, id: Bytes, start: u64) {
        let Some(router) = &mut self.replay else {
            return;
        };
        for (seq, payload) in self.buffer.iter().filter(|(s, _)| *s >= start) {
            let frames = vec![
                id.clone(),
                Bytes::new(),
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload.clone(),
            ];
            if let Ok(msg) = ZmqMessage::try_from(frames)
                && router.send(msg).await.is_err()
            {
                return;
            }
        }
        let end = vec![
            id,
            Bytes::new(),
            Bytes::copy_from_slice(&END_SEQ.to_be_bytes()),
            Bytes::new(),
        ];
        if let Ok(msg) = ZmqMessage::try_from(end) {
            let _ = router.send(msg).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Value {
        rmpv::decode::read_value(&mut &bytes[..]).unwrap()
    }

    #[test]
    fn a_chain_of_stores_is_one_block_stored_and_layouts_differ_only_in_form() {
        let events = vec![
            CacheEvent::Stored {
                hash: 10,
                parent: None,
                tokens: vec![1, 2],
            },
            CacheEvent::Stored {
                hash: 11,
                parent: Some(10),
                tokens: vec![3, 4],
            },
            CacheEvent::Removed { hash: 7 },
            CacheEvent::Removed { hash: 8 },
            CacheEvent::Cleared,
        ];
        let v = decode(&encode_batch(1.5, &events, 2, KvEventsFormat::Array));
        let batch = v.as_array().unwrap();
        assert_eq!(batch[0].as_f64(), Some(1.5));
        assert_eq!(batch[2].as_u64(), Some(0));
        let ev = batch[1].as_array().unwrap();
        assert_eq!(ev.len(), 3);
        let stored = ev[0].as_array().unwrap();
        assert_eq!(stored[0].as_str(), Some("BlockStored"));
        assert_eq!(stored.len(), 8);
        assert_eq!(
            stored[1],
            Value::Array(vec![Value::from(10u64), Value::from(11u64)])
        );
        assert!(stored[2].is_nil());
        assert_eq!(stored[3].as_array().unwrap().len(), 4);
        assert_eq!(stored[6].as_str(), Some("GPU"));
        let removed = ev[1].as_array().unwrap();
        assert_eq!(removed[0].as_str(), Some("BlockRemoved"));
        assert_eq!(removed[1].as_array().unwrap().len(), 2);
        assert_eq!(ev[2], Value::Array(vec![Value::from("AllBlocksCleared")]));

        let v = decode(&encode_batch(1.5, &events, 2, KvEventsFormat::Map));
        let ev = v.as_array().unwrap()[1].as_array().unwrap().clone();
        let first = ev[0].as_map().unwrap();
        assert_eq!(first[0], (Value::from("type"), Value::from("BlockStored")));
        assert_eq!(first[1].0.as_str(), Some("block_hashes"));
        assert_eq!(first.len(), 8);
    }

    #[test]
    fn a_store_of_another_chain_is_its_own_event() {
        let events = vec![
            CacheEvent::Stored {
                hash: 10,
                parent: None,
                tokens: vec![],
            },
            CacheEvent::Stored {
                hash: 20,
                parent: Some(99),
                tokens: vec![],
            },
        ];
        let v = decode(&encode_batch(0.0, &events, 2, KvEventsFormat::Array));
        assert_eq!(v.as_array().unwrap()[1].as_array().unwrap().len(), 2);
    }
}
