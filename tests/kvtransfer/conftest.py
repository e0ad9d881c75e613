"""Fixtures for kvtransfer tests: real owner engine processes reached over NIXL/UCX."""

from __future__ import annotations

import pytest
from kv_peers import OwnerProcess


@pytest.fixture(scope="module")
def bf16_owner():
    owner = OwnerProcess("bfloat16", seed=11)
    yield owner
    try:
        assert owner.stop() == 0
    finally:
        owner.ensure_dead()


@pytest.fixture(scope="module")
def fp32_owner():
    owner = OwnerProcess("float32", seed=22)
    yield owner
    try:
        assert owner.stop() == 0
    finally:
        owner.ensure_dead()
