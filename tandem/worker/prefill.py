"""``tandem prefill``: an engine that computes prompts and lends their KV blocks to decode workers over NIXL.

A request with ``kv_transfer_params: {"do_remote_decode": true}`` answers its first token plus the
``kv_transfer_params`` a decode worker needs to pull the prompt's KV; the blocks stay leased until that worker
confirms (or ``--kv-lease-seconds`` pass).
"""

from __future__ import annotations

import argparse

from tandem.engine.server.cli import add_arguments as add_server_arguments
from tandem.worker.disagg import add_kv_arguments, run_worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    add_kv_arguments(parser, "prefill")


def run(args: argparse.Namespace) -> int:
    return run_worker(args, "prefill")
