"""``tandem operator render FILE``: print what the operator would apply for an ``LLMDeployment`` file.

A user's dry run, like ``helm template``: no cluster is contacted. Each ``LLMDeployment`` in the file is checked
against the CRD's schema and rules (the same :func:`tandem.operator.spec.parse_spec` the operator runs) and
rendered by the same :func:`tandem.operator.render.render` the operator's handlers apply. The output is a YAML
stream; an invalid file is one line on stderr naming the offending fields, and exit status 1.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

import yaml

from tandem.operator.render import render
from tandem.operator.spec import API_VERSION, KIND, SpecError

DEFAULT_NAMESPACE = "default"
# NOTE: the API server assigns an object's uid when it creates it; children point at it. Rendered before
# that, the children's ownerReferences are left out (applied by hand with a made-up uid, the garbage
# collector would delete them as orphans).
_PENDING_UID = "pending"


class RenderError(ValueError):
    """A file that cannot be rendered; the message is the one line the user sees."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``tandem operator render``."""
    parser.add_argument("file", metavar="FILE", help="an LLMDeployment manifest (a YAML stream; - reads stdin)")
    parser.add_argument("--namespace", "-n", dest="render_namespace", default=None, metavar="NS",
                        help="the namespace to render into (default: the object's own, else default)")


def _documents(text: str, source: str) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise RenderError(f"{source}: not valid YAML ({' '.join(str(e).split())})") from None


def render_object(obj: Any, namespace: str | None, where: str) -> list[dict[str, Any]]:
    """The children of one ``LLMDeployment`` as the operator would apply them in ``namespace``."""
    if not isinstance(obj, Mapping) or obj.get("apiVersion") != API_VERSION or obj.get("kind") != KIND:
        found = f"{obj.get('apiVersion')}/{obj.get('kind')}" if isinstance(obj, Mapping) else type(obj).__name__
        raise RenderError(f"{where}: not an {KIND} (apiVersion {API_VERSION}); found {found}")
    meta = dict(obj.get("metadata") or {})
    if not meta.get("name"):
        raise RenderError(f"{where}: metadata.name: required")
    own = meta.get("namespace")
    if namespace and own and own != namespace:
        raise RenderError(f"{where}: metadata.namespace is {own!r} but --namespace is {namespace!r}")
    meta["namespace"] = namespace or own or DEFAULT_NAMESPACE
    known_uid = bool(meta.get("uid"))
    meta.setdefault("uid", _PENDING_UID)
    try:
        manifests = render({**obj, "metadata": meta})
    except SpecError as e:
        raise RenderError(f"{where} ({meta['name']}): {e}") from None
    if not known_uid:
        for m in manifests:
            m["metadata"].pop("ownerReferences", None)
    return manifests


def render_file(path: str, namespace: str | None, stdin: TextIO) -> list[dict[str, Any]]:
    """Every child of every ``LLMDeployment`` in ``path`` (``-``: stdin), in file order."""
    if path == "-":
        text, source = stdin.read(), "<stdin>"
    else:
        try:
            text, source = Path(path).read_text(), path
        except OSError as e:
            raise RenderError(f"{path}: {e.strerror or e}") from None
    documents = _documents(text, source)
    if not documents:
        raise RenderError(f"{source}: no {KIND} in the file")
    out: list[dict[str, Any]] = []
    for i, doc in enumerate(documents, 1):
        where = source if len(documents) == 1 else f"{source} document {i}"
        out += render_object(doc, namespace, where)
    return out


def run(args: argparse.Namespace) -> int:
    """Print the YAML stream, or one ``error:`` line and return 1."""
    stdout, stderr = sys.stdout, sys.stderr
    try:
        manifests = render_file(args.file, args.render_namespace, sys.stdin)
    except RenderError as e:
        print(f"error: {e}", file=stderr)
        return 1
    if any("ownerReferences" not in m["metadata"] for m in manifests):
        stdout.write("# ownerReferences left out: the API server assigns the LLMDeployment's uid when it is "
                     "created\n")
    stdout.write(yaml.safe_dump_all(manifests, sort_keys=False, default_flow_style=False))
    return 0
