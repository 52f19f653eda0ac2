"""Shared fixtures: the workspace's binaries, and a Python client generated
from proto/ with grpcio-tools at test time (nothing generated is committed)."""

import importlib
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
TARGET = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))


def binary(name: str) -> pathlib.Path:
    path = TARGET / "debug" / name
    assert path.exists(), f"{path} is not built: scripts/test.sh builds the workspace first"
    return path


@pytest.fixture(scope="session")
def pb(tmp_path_factory):
    """The generated scaleout.v1 modules: pb.command, pb.query, pb.read, pb.common (and their _grpc stubs)."""
    out = tmp_path_factory.mktemp("generated")
    from grpc_tools import protoc
    import grpc_tools

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    code = protoc.main(
        ["protoc", f"-I{ROOT / 'proto'}", f"-I{well_known}", f"--python_out={out}", f"--grpc_python_out={out}", *protos]
    )
    assert code == 0, "protoc failed on proto/"
    sys.path.insert(0, str(out))

    class Modules:
        common = importlib.import_module("scaleout.v1.common_pb2")
        command = importlib.import_module("scaleout.v1.command_service_pb2")
        command_grpc = importlib.import_module("scaleout.v1.command_service_pb2_grpc")
        query = importlib.import_module("scaleout.v1.query_service_pb2")
        query_grpc = importlib.import_module("scaleout.v1.query_service_pb2_grpc")
        read = importlib.import_module("scaleout.v1.read_service_pb2")
        read_grpc = importlib.import_module("scaleout.v1.read_service_pb2_grpc")

    return Modules


def help_text(name: str) -> str:
    """What `<binary> --help` prints: every flag and its environment variable."""
    return subprocess.run([binary(name), "--help"], capture_output=True, text=True, check=True).stdout
