"""Fixtures for operator tests: the API server emulator on a local port, and the real kopf operator against it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import kmock
import pytest

import crd_schema
from k8s_emulator import ApiServerEmulator
from operator_support import Cluster, RunningOperator, running_operator
from tandem.kube import plain
from tandem.operator.kube import KubeClient


@pytest.fixture
async def cluster() -> AsyncIterator[Cluster]:
    async with ApiServerEmulator() as api, kmock.Server(api) as server:
        api.add_crd(crd_schema.load_crd())
        url = str(server.url).rstrip("/")
        user = KubeClient(plain(url), field_manager="kubectl")  # a user's own writes
        try:
            yield Cluster(api=api, url=url, user=user)
        finally:
            await user.aclose()


@pytest.fixture
async def operator(cluster: Cluster) -> AsyncIterator[RunningOperator]:
    """The operator over the whole cluster (the chart's default)."""
    async with running_operator(cluster) as running:
        yield running
