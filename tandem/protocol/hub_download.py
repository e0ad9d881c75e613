"""Fetching a model from the Hugging Face Hub into its cache, with one-line errors (torch-free).

``huggingface_hub`` does the work and reads its own settings from the environment: ``HF_ENDPOINT`` (a
mirror), ``HF_TOKEN`` or ``HF_TOKEN_PATH`` (a token file, as a Kubernetes secret is mounted), ``HF_HOME`` /
``HF_HUB_CACHE`` (where the cache is) and ``HF_HUB_OFFLINE`` (never touch the network). What this module adds:
a cached copy is used without asking the Hub (so a restart needs no network), a download shows a progress
bar even when stderr is not a terminal (a pod's log), and every failure becomes a ModelNotFoundError whose
message is one line saying what to do.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tandem.protocol.model_source import HubModel, ModelNotFoundError


def fetch(hub: HubModel, allow: tuple[str, ...], ignore: tuple[str, ...], *, need_weights: bool,
          refresh: bool = False) -> Path:
    """Snapshot directory of ``hub`` holding the files matching ``allow`` (not ``ignore``).

    A complete cached snapshot is returned without any request unless ``refresh``; otherwise the Hub is asked
    (and when it cannot be reached, a complete cached snapshot still serves). ``need_weights`` requires
    config.json and safetensors weights (all shards of an index).
    """
    from huggingface_hub import HfApi, snapshot_download

    patterns = {"allow_patterns": list(allow), "ignore_patterns": list(ignore)}
    cached = _cached(hub, patterns, need_weights)
    if cached is not None and not refresh:
        return cached
    bars, opened = _progress_bars()
    _quiet_request_log()
    try:
        # NOTE: the listing first: an unknown, gated or safetensors-less repository fails before any download.
        info = HfApi().model_info(hub.repo_id, revision=hub.revision)
        _check_listing(hub, info, patterns, need_weights)
        path = Path(snapshot_download(hub.repo_id, revision=hub.revision, tqdm_class=bars, **patterns))
    except ModelNotFoundError:
        raise
    except Exception as exc:  # huggingface_hub raises many types; each becomes one line below
        for bar in opened:
            bar.close()  # NOTE: before the error line, so that it is the last thing on stderr
        if cached is not None and (_is_unreachable(exc) or _is_server_error(exc)):
            print(f"warning: model {hub}: the Hub failed ({_root_cause(exc)}); using the cached copy {cached}",
                  file=sys.stderr)
            return cached
        raise ModelNotFoundError(_explain(hub, exc)) from exc
    problem = _missing(path, need_weights)
    if problem is not None:
        raise ModelNotFoundError(f"model {hub}: {problem}")
    return path


def _quiet_request_log() -> None:
    """The Hub client's HTTP library logs every request at INFO; a server's INFO log would list each file twice."""
    import logging

    client_log = logging.getLogger("httpx2")
    if client_log.level == logging.NOTSET:
        client_log.setLevel(logging.WARNING)


def _cached(hub: HubModel, patterns: dict, need_weights: bool) -> Path | None:
    """The cached snapshot of ``hub`` if it holds every file needed, without any request; else None."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(hub.repo_id, revision=hub.revision, local_files_only=True, **patterns))
    except (LocalEntryNotFoundError, OSError, ValueError):
        return None  # NOTE: not cached, or cached incompletely
    return path if _missing(path, need_weights) is None else None


def _progress_bars():
    """A tqdm class for one download, and the list of the bars it opened.

    Plain tqdm: huggingface_hub's own bars hide themselves when stderr is not a terminal, as in a pod's log.
    ``HF_HUB_DISABLE_PROGRESS_BARS=1`` still turns them off.
    """
    from huggingface_hub.utils import are_progress_bars_disabled
    from tqdm import tqdm

    opened: list[tqdm] = []
    disabled = are_progress_bars_disabled()

    class DownloadProgress(tqdm):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **{**kwargs, "disable": disabled})
            opened.append(self)

    return DownloadProgress, opened


def _check_listing(hub: HubModel, info, patterns: dict, need_weights: bool) -> None:
    """Refuse, from the repository's listing, a gated repository without a token and one without safetensors."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import filter_repo_objects

    if info.gated and get_token() is None:
        raise ModelNotFoundError(_gated_without_token(hub, constants.ENDPOINT))
    names = [s.rfilename for s in info.siblings or ()]
    wanted = list(filter_repo_objects(names, **patterns))
    if need_weights and names and not any(n.endswith(".safetensors") for n in wanted):
        others = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")))
        found = f" (it has {', '.join(others[:3])})" if others else ""
        raise ModelNotFoundError(
            f"model {hub}: the repository has no .safetensors weights{found}; Tandem loads safetensors only: "
            "convert the checkpoint (transformers' save_pretrained(safe_serialization=True)) or pick a repository "
            "that has them"
        )


def _gated_without_token(hub: HubModel, endpoint: str) -> str:
    return (f"model {hub}: {hub.repo_id} is a gated repository and no Hub token is set: set HF_TOKEN (or "
            "HF_TOKEN_PATH to a file holding it; in a cluster, model.hfTokenSecretRef) to a token of an account "
            f"granted access at {endpoint}/{hub.repo_id}")


def _is_server_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a 5xx answer from the Hub (an outage: a complete cached copy still serves)."""
    from huggingface_hub.errors import HfHubHTTPError

    response = exc.response if isinstance(exc, HfHubHTTPError) else None
    return response is not None and response.status_code >= 500


def _is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the Hub could not be reached (network, timeout, offline mode)."""
    import httpx2
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    return isinstance(exc, (httpx2.TransportError, OfflineModeIsEnabled, LocalEntryNotFoundError,
                            ConnectionError, TimeoutError))


def _missing(directory: Path, need_weights: bool) -> str | None:
    """What ``directory`` lacks for serving (or for tokenizing), or None when it is complete."""
    names = {p.name for p in directory.iterdir()} if directory.is_dir() else set()
    if not need_weights:
        if not names & {"tokenizer.json", "tokenizer_config.json"}:
            return "the repository has no tokenizer (tokenizer.json or tokenizer_config.json)"
        return None
    if "config.json" not in names:
        return "the repository has no config.json"
    weights = sorted(n for n in names if n.endswith(".safetensors"))
    if not weights:
        return ("the repository has no .safetensors weights (Tandem loads safetensors only; convert the "
                "checkpoint, e.g. with transformers' save_pretrained(safe_serialization=True))")
    for index in (n for n in names if n.endswith(".safetensors.index.json")):
        try:
            shards = set(json.loads((directory / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{index} is not a valid safetensors index"
        absent = sorted(shards - names)
        if absent:
            return f"{index} names shards that are not in the download: {', '.join(absent[:3])}"
    return None


def _explain(hub: HubModel, exc: Exception) -> str:
    """One line for a failed download: what happened and what the user can do."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = constants.ENDPOINT
    if isinstance(exc, GatedRepoError):
        if get_token() is None:
            return _gated_without_token(hub, endpoint)
        return (f"model {hub}: {hub.repo_id} is a gated repository and the Hub token in use (HF_TOKEN / "
                f"HF_TOKEN_PATH) has no access to it: request access at {endpoint}/{hub.repo_id}")
    if isinstance(exc, RepositoryNotFoundError):
        return (f"model {hub}: repository {hub.repo_id} not found on {endpoint} (check the name; a private "
                "repository also needs HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return f"model {hub}: revision {hub.revision!r} not found in {hub.repo_id} on {endpoint}"
    if _is_unreachable(exc):
        prefill = (f"fill the cache first with `tandem download --model {hub}` on a machine that reaches the Hub "
                   "(HF_HOME on a volume shared with this one), or serve the model from a volume "
                   "(pvc://CLAIM/PATH or file:///PATH)")
        if constants.HF_HUB_OFFLINE:
            return (f"model {hub}: HF_HUB_OFFLINE is set and {hub.repo_id} is not in the cache "
                    f"({constants.HF_HUB_CACHE}); {prefill}")
        cause = _root_cause(exc)
        return (f"model {hub}: cannot reach the Hub at {endpoint} ({cause}) and {hub.repo_id} is not in the cache "
                f"({constants.HF_HUB_CACHE}); {prefill}")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "an error"
        return f"model {hub}: the Hub at {endpoint} answered {status}: {_first_line(exc)}"
    if isinstance(exc, OSError):
        return f"model {hub}: cannot write the Hugging Face cache ({constants.HF_HUB_CACHE}): {_first_line(exc)}"
    return f"model {hub}: download failed: {type(exc).__name__}: {_first_line(exc)}"


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's one-line description (e.g. the refused connection behind a LocalEntryNotFound)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return f"{type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
