"""``tandem decode``: an engine that pulls a prompt's KV from a prefill worker over NIXL, then generates.

A request carrying the prefill's ``kv_transfer_params`` (``do_remote_prefill``) streams the prefill's first
token at once, waits for the remote KV while the rest of the batch runs, then computes that token's KV and
streams the rest as ``tandem serve`` would. A failed
pull recomputes the prompt (``--kv-load-failure-policy recompute``) or answers 502 (``fail``).
"""

from __future__ import annotations

import argparse

from tandem.engine.server.cli import add_arguments as add_server_arguments
from tandem.worker.disagg import add_kv_arguments, run_worker


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_server_arguments(parser)
    add_kv_arguments(parser, "decode")


def run(args: argparse.Namespace) -> int:
    return run_worker(args, "decode")
