"""The ``tandem`` command line: one entry point, one subcommand per component.

Each subcommand lives in its component's module, which exposes ``add_arguments(parser)`` and
``run(args) -> int``. Modules import lazily, so ``tandem router`` never loads torch and
``tandem --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("tandem.engine.cli", "generate a completion for one prompt with the offline engine"),
    "serve": ("tandem.engine.server.cli", "serve one aggregated engine over the OpenAI API"),
    "prefill": ("tandem.worker.prefill", "run a prefill worker (computes prompts, ships KV over NIXL)"),
    "decode": ("tandem.worker.decode", "run a decode worker (pulls KV over NIXL, streams tokens)"),
    "router": ("tandem.router.cli", "run the prefix-aware OpenAI-compatible router"),
    "up": ("tandem.up", "start router + workers locally on 127.0.0.1"),
    "operator": ("tandem.operator.cli", "run the Kubernetes operator (kopf)"),
    "bench": ("tandem.bench.cli", "benchmark any OpenAI-compatible endpoint"),
    "download": ("tandem.download", "fetch a model (hf://ORG/NAME) into the Hugging Face cache and exit"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {n: v for n, v in SUBCOMMANDS.items() if importlib.util.find_spec(v[0].rsplit(".", 1)[0]) is not None}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem LLM serving platform")
    parser.add_argument("--version", action="version", version=f"tandem {__import__('tandem').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in _available().items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command is not None and command not in _available():
        build_parser().error(f"unknown command {command!r}")
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
