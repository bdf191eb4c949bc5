"""Regenerate ``_generated/open_inference_pb2.py`` (+ ``.pyi``) from ``open_inference.proto``.

Run ``python -m modelpod.protocols._generate`` (needs grpcio-tools). Two edits follow protoc:

- the descriptors go into a private pool, not protobuf's default one: tritonclient (and other OIP
  clients) register the same ``inference.*`` names there, and one process may hold both;
- the gencode/runtime version pin is dropped, so the stubs work with any protobuf that has the
  builder API (>= 4.21), not only the release grpcio-tools happened to bundle.

No ``_pb2_grpc.py`` is generated: ``modelpod.protocols.grpc`` registers its handlers itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROTO = HERE / "open_inference.proto"
OUT = HERE / "_generated"
PACKAGE_PATH = "modelpod/protocols/_generated"


def generate() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        target = root / PACKAGE_PATH
        target.mkdir(parents=True)
        shutil.copyfile(PROTO, target / PROTO.name)
        subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"--python_out={root}", f"--pyi_out={root}",
             f"{PACKAGE_PATH}/{PROTO.name}"],
            check=True,
        )
        OUT.mkdir(exist_ok=True)
        (OUT / "__init__.py").write_text('"""Stubs generated from ../open_inference.proto; see ../_generate.py."""\n')
        code = (target / "open_inference_pb2.py").read_text()
        code = code.replace("_descriptor_pool.Default().AddSerializedFile",
                            "_descriptor_pool.DescriptorPool().AddSerializedFile")
        code = re.sub(r"from google\.protobuf import runtime_version as _runtime_version\n", "", code)
        code = re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)\n", "", code)
        if "DescriptorPool()" not in code or "_runtime_version" in code:
            raise SystemExit("protoc output changed shape; update _generate.py")
        (OUT / "open_inference_pb2.py").write_text(code)
        shutil.copyfile(target / "open_inference_pb2.pyi", OUT / "open_inference_pb2.pyi")


if __name__ == "__main__":
    generate()
