"""Decodes engine-sim's KV cache events with vLLM's own encoder library.

Usage: vllm_kv_events.py EVENTS_ENDPOINT REPLAY_ENDPOINT FORMAT

The event classes below re-declare, field for field, the msgspec structs of
vLLM's `vllm/distributed/kv_events.py`:
- FORMAT `array`: the positional layout (`array_like=True` on the events),
  as at vLLM commit b4e69e0af33f for the tags and first fields, with
  `medium` and `lora_name` as later added;
- FORMAT `map`: the named-field layout that vLLM PR #42892 introduced
  (events are tagged maps, `type` the tag; fields after `lora_name` have
  defaults and are omitted when unset), as at vLLM commit 0181ea3173e5.
The batch is `array_like` in both: `[ts, events, data_parallel_rank]`.

Protocol (ZmqEventPublisher): the PUB socket sends (topic, seq as 8 bytes
big-endian, payload); the ROUTER replay socket takes (b"", start_seq) from a
DEALER and answers (b"", seq, payload) per buffered batch, then
(b"", -1, b"").

The script connects and prints `ready`; once a first batch has arrived
(the caller resets the empty cache until then: a SUB socket misses what is
sent before its subscription reaches the publisher) it prints `live`. It
then collects batches until an AllBlocksCleared follows a BlockStored, asks
for a replay from 0 and checks that the replay agrees with what it received
live. It prints one JSON object: every event replayed, in order, as decoded
by msgspec with strict typing.
"""

import json
import sys
from typing import Any

import msgspec
import zmq

FORMAT = sys.argv[3]
ARRAY = FORMAT == "array"


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(
    msgspec.Struct, array_like=ARRAY, omit_defaults=True, gc=False, tag=True
):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


decoder = msgspec.msgpack.Decoder(type=KVEventBatch)


def as_json(event: Any) -> dict:
    if isinstance(event, BlockStored):
        return {
            "kind": "stored",
            "hashes": event.block_hashes,
            "parent": event.parent_block_hash,
            "tokens": event.token_ids,
            "block_size": event.block_size,
            "medium": event.medium,
        }
    if isinstance(event, BlockRemoved):
        return {"kind": "removed", "hashes": event.block_hashes, "medium": event.medium}
    return {"kind": "cleared"}


def main() -> None:
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVTIMEO, 30_000)
    sub.connect(sys.argv[1])
    print("ready", flush=True)

    live: dict[int, bytes] = {}
    stored = False
    while True:
        topic, seq_bytes, payload = sub.recv_multipart()
        seq = int.from_bytes(seq_bytes, "big")
        if not live:
            print("live", flush=True)
        live[seq] = payload
        batch = decoder.decode(payload)
        stored = stored or any(isinstance(e, BlockStored) for e in batch.events)
        if stored and any(isinstance(e, AllBlocksCleared) for e in batch.events):
            break

    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.RCVTIMEO, 30_000)
    dealer.connect(sys.argv[2])
    dealer.send_multipart((b"", (0).to_bytes(8, "big")))
    replayed: dict[int, bytes] = {}
    while True:
        _, seq_bytes, payload = dealer.recv_multipart()
        seq = int.from_bytes(seq_bytes, "big", signed=True)
        if seq == -1:
            break
        replayed[seq] = payload

    for seq, payload in live.items():
        if replayed.get(seq) != payload:
            raise SystemExit(f"replay of batch {seq} differs from the live one")
    seqs = sorted(replayed)
    if seqs != list(range(len(seqs))):
        raise SystemExit(f"replayed sequence numbers are not 0..n: {seqs}")

    events = []
    for seq in seqs:
        batch = decoder.decode(replayed[seq])
        if batch.data_parallel_rank != 0 or batch.ts <= 0:
            raise SystemExit(f"batch {seq}: bad envelope {batch}")
        events.extend(as_json(e) for e in batch.events)
    print(
        json.dumps({"live": len(live), "batches": len(seqs), "events": events}),
        flush=True,
    )


if __name__ == "__main__":
    main()
