"""KVTransferParams: parsed once at the HTTP edge, the wire format unchanged."""

from __future__ import annotations

import pytest

from tandem.protocol.kv_transfer import KVTransferParams

PREFILL_ANSWER = {
    "do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": "e1", "remote_host": "10.0.0.1",
    "remote_port": 5600, "remote_block_ids": [3, 4], "remote_request_id": "r1", "num_prompt_tokens": 20,
    "block_size": 16, "lease_seconds": 30.0, "lease_expires_at": 1.7e9, "first_token_id": 42,
    "first_token_logprobs": {"42": -0.5, "7": -1.5},
}


def test_round_trip_keeps_the_wire_format():
    params = KVTransferParams.parse(PREFILL_ANSWER)
    assert params.remote_block_ids == (3, 4) and params.first_token_logprobs == {42: -0.5, 7: -1.5}
    assert params.to_dict() == PREFILL_ANSWER
    assert KVTransferParams.parse({"do_remote_decode": True}).to_dict() == {"do_remote_decode": True}
    assert KVTransferParams.parse(None) is None


def test_other_connectors_fields_are_relayed():
    vllm = {**PREFILL_ANSWER, "tp_size": 1}
    assert KVTransferParams.parse(vllm).to_dict() == vllm


@pytest.mark.parametrize("field,value", [
    ("remote_port", 70000), ("remote_port", "5600"), ("remote_block_ids", [1, -1]), ("first_token_id", True),
    ("do_remote_prefill", "yes"), ("first_token_logprobs", [1, 2]), ("lease_expires_at", "soon"),
])
def test_bad_fields_are_named(field, value):
    with pytest.raises(ValueError, match=rf"^kv_transfer_params\.{field}:"):
        KVTransferParams.parse({**PREFILL_ANSWER, field: value})
