"""Process-level settings every long-running Tandem server shares: garbage collection and process metrics.

Keep Python's cyclic garbage collector off the request path of long-running servers.

After start-up a Tandem process holds a few hundred thousand long-lived container objects (torch,
transformers, FastAPI, the model's modules). Every full (generation 2) collection walks all of them; profiled
on a decode worker under disaggregated load, ``gc_collect_main`` and its visitors took ~60% of the process's
CPU, stalling the engine thread, the event loop and the KV load thread alike. ``freeze()`` moves everything
alive at the end of start-up into the permanent generation, which the collector never scans again (what
vLLM's engine does after its own warm-up); objects created later are collected as usual.
"""

from __future__ import annotations

import gc
import logging
import time

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

logger = logging.getLogger(__name__)


def freeze_startup_heap(component: str) -> None:
    """Collect once, then exempt every object alive now from future collections."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    logger.info("%s: froze %d start-up objects out of garbage collection (%.0f ms)", component,
                gc.get_freeze_count(), (time.perf_counter() - started) * 1e3)


def register_process_collectors(registry: CollectorRegistry) -> None:
    """Add the standard ``process_*`` (CPU, memory, fds), ``python_gc_*`` and ``python_info`` series.

    NOTE: Prometheus clients export these from their default registry; every Tandem server keeps its own
    registry, so they are added explicitly (dashboards and alerts on them work as for vLLM).
    """
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)
    PlatformCollector(registry=registry)
