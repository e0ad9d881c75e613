"""``tandem download``: fetch a model into the Hugging Face cache and exit (no torch, no server).

An init container runs it before the engine starts, so a pod downloads once and the engine starts from the
cache (``HF_HOME`` on the pod's cache volume). Exit status 0 when the files are in the cache, 1 with one line
on stderr otherwise.
"""

from __future__ import annotations

import argparse
import sys

from tandem.protocol.model_source import (
    DEFAULT_MODEL,
    ModelNotFoundError,
    fetch,
    hub_model_of,
    resolve_model,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="hf://ORG/NAME[@REVISION] or ORG/NAME (also accepts the other --model forms, which "
                             "need no download and are only checked); default %(default)s")
    parser.add_argument("--tokenizer-only", action="store_true",
                        help="fetch only the tokenizer files (what the router needs)")


def run(args: argparse.Namespace) -> int:
    try:
        hub = hub_model_of(args.model)
        if hub is not None:
            # NOTE: refresh: an explicit download asks the Hub for the revision's latest commit.
            path = fetch(hub, tokenizer_only=args.tokenizer_only, refresh=True)
        else:
            path = resolve_model(args.model, tokenizer_only=args.tokenizer_only).directory
    except ModelNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


def prefetch_or_exit(model: str | None) -> None:
    """Download a Hub model before an engine command starts anything, or print one line and exit 1.

    Every engine command (``serve``, ``generate``, ``prefill``, ``decode``) builds its configuration through
    ``engine_config_from_args``, which calls this: the download (with its progress bar) happens before a server
    binds a port, and a failure is one ``error:`` line and status 1 whatever the command. Other model forms are
    left to the engine, which reports them as before.
    """
    name = model or DEFAULT_MODEL
    try:
        if hub_model_of(name) is None:
            return
        resolve_model(name)
    except ModelNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None

