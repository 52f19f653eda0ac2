"""Mutual TLS from the generated Python client and from grpcurl, against the
shipped command-svc binary: certificates made here with the openssl CLI;
a client with a certificate from the client CA is served, one without is
refused, and `--check-health` speaks TLS with the server's own flags."""

import subprocess

import grpc
import pytest

from conftest import binary
from processes import Process


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def certificates(tmp_path):
    """A CA, and a certificate it issued for localhost (server and client use)."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=scaleout test CA",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign",
            cwd=tmp_path)
    for name in ("server", "client"):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=tmp_path)
        (tmp_path / f"{name}.ext").write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n"
        )
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
                cwd=tmp_path)
    return tmp_path


def test_mutual_tls_from_python_and_grpcurl(pb, certificates, tmp_path):
    tls = ["--tls-cert", str(certificates / "server.crt"), "--tls-key", str(certificates / "server.key"),
           "--tls-client-ca", str(certificates / "ca.crt")]
    command = Process("command-svc", "--listen", "127.0.0.1:0", "--event-store", f"redb:{tmp_path}/events.redb",
                      *tls)
    try:
        port = command.address.rsplit(":", 1)[1]
        target = f"localhost:{port}"
        ca = (certificates / "ca.crt").read_bytes()

        def increment(credentials):
            with grpc.secure_channel(target, credentials) as channel:
                stub = pb.command_grpc.CommandServiceStub(channel)
                request = pb.command.IncrementCounterRequest(counter_id="tls")
                return stub.IncrementCounter(request, timeout=10).result.version

        served = grpc.ssl_channel_credentials(
            root_certificates=ca,
            private_key=(certificates / "client.key").read_bytes(),
            certificate_chain=(certificates / "client.crt").read_bytes(),
        )
        assert increment(served) == 1
        with pytest.raises(grpc.RpcError) as refused:
            increment(grpc.ssl_channel_credentials(root_certificates=ca))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        def grpcurl(*args):
            return subprocess.run(["grpcurl", "-cacert", str(certificates / "ca.crt"), *args],
                                  capture_output=True, text=True, timeout=30)

        client = ["-cert", str(certificates / "client.crt"), "-key", str(certificates / "client.key")]
        listed = grpcurl(*client, target, "list")
        assert listed.returncode == 0, listed.stderr
        assert "scaleout.v1.CommandService" in listed.stdout
        called = grpcurl(*client, "-d", '{"counter_id": "tls"}', target, "scaleout.v1.CommandService/IncrementCounter")
        assert called.returncode == 0, called.stderr
        assert '"version": "2"' in called.stdout
        without_certificate = grpcurl(target, "list")
        assert without_certificate.returncode != 0

        health = subprocess.run([binary("command-svc"), "--check-health", "--listen", command.address, *tls],
                                capture_output=True, text=True, timeout=30)
        assert health.returncode == 0, health.stderr
    finally:
        command.stop()


def hs256(secret, claims):
    """A JWT signed with HS256, made with the standard library."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(data):
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def test_bearer_tokens_from_python(pb, tmp_path):
    import time

    secret = b"a development secret of at least 32 bytes"
    (tmp_path / "secret").write_bytes(secret)
    command = Process("command-svc", "--listen", "127.0.0.1:0", "--event-store", f"redb:{tmp_path}/events.redb",
                      "--auth-hs256-secret-file", str(tmp_path / "secret"), "--auth-audience", "scaleout")
    try:
        def token(scope, exp_in=600):
            claims = {"sub": "python-client", "aud": "scaleout", "exp": int(time.time()) + exp_in, "scope": scope}
            return ("authorization", f"Bearer {hs256(secret, claims)}")

        channel = command.channel()
        commands = pb.command_grpc.CommandServiceStub(channel)
        request = pb.command.IncrementCounterRequest(counter_id="py")
        for metadata, code in [
            ((), grpc.StatusCode.UNAUTHENTICATED),
            ((token("scaleout.commands", exp_in=-3600),), grpc.StatusCode.UNAUTHENTICATED),
            ((token("scaleout.queries"),), grpc.StatusCode.PERMISSION_DENIED),
        ]:
            with pytest.raises(grpc.RpcError) as refused:
                commands.IncrementCounter(request, metadata=metadata, timeout=10)
            assert refused.value.code() == code, refused.value
        assert commands.IncrementCounter(request, metadata=(token("scaleout.commands"),), timeout=10).result.version == 1

        reader = pb.read_grpc.ReadServiceStub(channel)
        logged = reader.ReadAll(pb.read.ReadAllRequest(limit=10), metadata=(token("scaleout.read"),), timeout=10)
        assert [event.event.actor for event in logged.events] == ["python-client"]
    finally:
        command.stop()
