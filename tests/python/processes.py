"""Running the workspace's binaries as processes and reaching them."""

import os
import re
import subprocess
import threading
import time
import uuid

import grpc

from conftest import binary

POSTGRES_URL = os.environ.get(
    "SCALEOUT_TEST_POSTGRES_URL", "postgres://scaleout:scaleout@127.0.0.1:5432/scaleout"
)
RABBITMQ_URL = os.environ.get("SCALEOUT_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")


class Process:
    """A binary that prints its address once serving; stopped with SIGTERM."""

    def __init__(self, name, *args, ready=r"address=(\S+)"):
        env = dict(os.environ, SCALEOUT_LOG_FORMAT="text", RUST_LOG="warn,command_svc=info,projector=info,query_svc=info,scaleout=info")
        self.name = name
        self.child = subprocess.Popen(
            [binary(name), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.address = None
        deadline = time.monotonic() + 60
        for line in self.child.stdout:
            found = re.search(ready, line)
            if found:
                self.address = found.group(1)
                break
            assert time.monotonic() < deadline, f"{name} did not start in time"
        assert self.address, f"{name} exited before saying where it serves"
        # Keep draining the log so the process never blocks on a full pipe.
        threading.Thread(target=lambda: [None for _ in self.child.stdout], daemon=True).start()

    def stop(self):
        self.child.terminate()
        try:
            return self.child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.child.kill()
            raise AssertionError(f"{self.name} ignored SIGTERM")

    def channel(self):
        channel = grpc.insecure_channel(self.address)
        grpc.channel_ready_future(channel).result(timeout=10)
        return channel


def unique(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def drop_postgres_schema(schema):
    subprocess.run(
        ["psql", POSTGRES_URL, "-q", "-c", f"DROP SCHEMA IF EXISTS {schema} CASCADE"],
        check=True,
        capture_output=True,
    )


def delete_rabbitmq_topology(prefix, service_types):
    """Removes a test's queues and exchanges from the shared broker."""
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    try:
        channel = connection.channel()
        for service in service_types:
            for queue in (f"{prefix}.{service}", f"{prefix}.{service}.dead-letter"):
                channel.queue_delete(queue)
        for exchange in (f"{prefix}.events", f"{prefix}.dead-letter"):
            channel.exchange_delete(exchange)
    finally:
        connection.close()
