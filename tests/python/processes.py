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
    """A binary that prints its address once serving; stopped with SIGTERM.

    `launch` runs it some other way than the workspace's build: the command
    line up to the arguments (its last process must exec the binary, so that
    SIGTERM reaches it), with `env` instead of this process's environment."""

    def __init__(self, name, *args, ready=r"address=(\S+)", launch=None, env=None):
        env = dict(
            os.environ if env is None else env,
            SCALEOUT_LOG_FORMAT="text",
            RUST_LOG="warn,command_svc=info,projector=info,query_svc=info,scaleout=info",
        )
        self.name = name
        self.child = subprocess.Popen(
            [*(launch or [binary(name)]), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        self.address = None
        log = []
        started = time.monotonic()
        # One that has not said it within a minute is killed, which ends the loop.
        watchdog = threading.Timer(60, self.child.kill)
        watchdog.start()
        try:
            for line in self.child.stdout:
                found = re.search(ready, line)
                if found:
                    self.address = found.group(1)
                    break
                log.append(line)
        finally:
            watchdog.cancel()
        if not self.address:
            self.child.kill()
            code = self.child.wait()
            why = "ran 60s" if time.monotonic() - started >= 60 else f"exited with {code}"
            raise AssertionError(f"{name} {why} before saying where it serves:\n{''.join(log[-20:])}")
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
