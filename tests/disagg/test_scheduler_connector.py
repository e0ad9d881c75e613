"""The scheduler's side of the connector contract, on real scheduler/KV-manager objects and a scripted
connector (no model, no NIXL): loads land in the right blocks, failures recompute or end the request, an
abort during a load frees the blocks only once the READ is over, and the notification/params formats."""

from __future__ import annotations

import pytest
from helpers import create_request

from tandem.engine.config import SchedulerConfig
from tandem.engine.core.kv_cache_manager import KVCacheManager
from tandem.engine.core.request import RequestStatus
from tandem.engine.core.scheduler import Scheduler
from tandem.kvtransfer.connector import (
    RemotePrefill,
    block_range,
    format_notification,
    num_tokens_to_load,
    parse_notification,
)

BLOCK = 4


class ScriptedConnector:
    """Decode-side connector whose loads finish when the test says so (``finish``)."""

    def __init__(self, fail_error: str | None = None) -> None:
        self.started: dict[str, tuple[list[int], int]] = {}  # request id -> (block ids, first block to load)
        self.finished: dict[str, bool] = {}
        self.fail_error = fail_error
        self.released: list[str] = []  # requests whose remote blocks were given up without a load

    def get_num_new_matched_tokens(self, request, num_local_computed_tokens):
        return num_tokens_to_load(request) - num_local_computed_tokens

    def update_state_after_alloc(self, request, block_ids, num_local_blocks, num_external_tokens):
        self.started[request.request_id] = (list(block_ids), num_local_blocks)

    def finish(self, request_id: str, ok: bool) -> None:
        self.finished[request_id] = ok

    def get_finished_recving(self):
        done, self.finished = self.finished, {}
        return done

    def load_failure_error(self, request_id):
        return self.fail_error

    def request_finished(self, request, block_ids):
        self.released.append(request.request_id)
        return False, None

    def get_finished_sending(self):
        return []


def create(connector, num_blocks=16):
    kv = KVCacheManager(num_blocks, BLOCK, True)
    return Scheduler(SchedulerConfig(max_num_batched_tokens=64, max_model_len=64), kv, connector)


def remote_request(rid="r", prompt_len=10):
    request = create_request(rid, list(range(1, prompt_len + 1)), max_tokens=2, block_size=BLOCK)
    request.kv_transfer_params = {"do_remote_prefill": True}
    return request


def test_successful_load_computes_only_the_last_prompt_token():
    connector = ScriptedConnector()
    sched = create(connector)
    sched.add_request(remote_request())
    out = sched.schedule()
    assert out.scheduled == []  # parked while the KV arrives
    request = sched.remote_waiting["r"]
    assert request.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    block_ids, first = connector.started["r"]
    assert first == 0 and len(block_ids) == len(block_range(9, BLOCK, 0)) == 3  # 9 tokens -> 3 blocks
    connector.finish("r", True)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("r", 1)]
    assert request.num_computed_tokens == 9 and request.kv_transfer_params is None


def test_a_handed_in_first_token_loads_the_whole_prompt_and_computes_only_itself():
    connector = ScriptedConnector()
    sched = create(connector)
    request = remote_request(prompt_len=12)  # 12 tokens: exactly 3 full blocks
    request.append_output_token(99)  # the prefill worker's first token
    request.num_preseeded_tokens = 1
    sched.add_request(request)
    assert sched.schedule().scheduled == []
    block_ids, _ = connector.started["r"]
    assert len(block_ids) == 3  # the whole prompt's KV; the first token's slot comes with the next step
    connector.finish("r", True)
    out = sched.schedule()
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("r", 1)]
    assert request.num_computed_tokens == 12 and len(out.scheduled[0].block_ids) == 4


def test_finishing_a_request_that_never_loaded_releases_its_remote_blocks():
    connector = ScriptedConnector()
    sched = create(connector)
    request = remote_request()
    sched.add_request(request)
    sched.finish_requests(["r"], RequestStatus.FINISHED_LENGTH_CAPPED)  # e.g. its handed-in token was the last
    assert connector.released == ["r"] and connector.started == {}
    assert sched.kv.pool.num_free_blocks == 16


@pytest.mark.parametrize("policy_error", [None, "kv transfer failed: peer gone"])
def test_failed_load_recomputes_or_ends_the_request_and_frees_its_blocks(policy_error):
    connector = ScriptedConnector(fail_error=policy_error)
    sched = create(connector)
    sched.add_request(remote_request())
    sched.schedule()
    connector.finish("r", False)
    out = sched.schedule()
    if policy_error is None:  # recompute: the whole prompt runs locally, once (no second load)
        assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("r", 10)]
        assert len(connector.started) == 1
    else:
        assert out.scheduled == []
        [(request, error)] = sched.take_failed()
        assert request.status == RequestStatus.FINISHED_ERROR and error == policy_error
        assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_blocks
        assert not sched.has_work()


def test_abort_while_loading_frees_the_blocks_only_after_the_read_is_over():
    connector = ScriptedConnector()
    sched = create(connector)
    sched.add_request(remote_request())
    sched.schedule()
    sched.finish_requests(["r"], RequestStatus.FINISHED_ABORTED)
    pool = sched.kv.pool
    assert pool.num_free_blocks == pool.num_blocks - 3  # a READ may still be writing into them
    assert sched.has_external_work()
    connector.finish("r", True)
    sched.schedule()
    assert pool.num_free_blocks == pool.num_blocks
    assert not sched.has_work()


def test_notifications_and_params_round_trip_and_reject_garbage():
    assert parse_notification(format_notification("req:with:colons", 7)) == ("req:with:colons", 7)
    assert parse_notification(b"done:x:abc") is None and parse_notification(b"hello") is None
    params = {"do_remote_prefill": True, "remote_engine_id": "e", "remote_host": "h", "remote_port": 5600,
              "remote_block_ids": [3, 4], "remote_request_id": "q", "num_prompt_tokens": 20, "block_size": 16}
    remote = RemotePrefill.from_params(params)
    assert remote.block_ids == (3, 4) and remote.port == 5600 and remote.lease_expires_at is None
    with pytest.raises(ValueError, match="remote_block_ids"):
        RemotePrefill.from_params({**params, "remote_block_ids": [1, -2]})
    with pytest.raises(ValueError, match="remote_port"):
        RemotePrefill.from_params({**params, "remote_port": "5600"})
