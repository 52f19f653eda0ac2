"""End to end, through a Python client generated from proto/ at test time:
the split deployment (command-svc on PostgreSQL and RabbitMQ, two projector
processes on Couchbase through the KV test server, query-svc) and the
embedded platform, each checked with grpcurl too."""

import concurrent.futures
import json
import subprocess
import uuid

import grpc
import pytest

from processes import (
    POSTGRES_URL,
    RABBITMQ_URL,
    Process,
    delete_rabbitmq_topology,
    drop_postgres_schema,
    unique,
)


@pytest.fixture
def split_deployment():
    schema = unique("e2e")
    prefix = unique("e2e").replace("_", "-")
    couchbase = Process("couchbase-kv-server", "--listen", "127.0.0.1:0", ready=r"listening on (\S+)")
    documents = ["--document-store", f"couchbase://{couchbase.address}"]
    bus = ["--event-bus", RABBITMQ_URL, "--event-bus-prefix", prefix]
    processes = [couchbase]
    try:
        # Events wait in the outbox until the projectors' queue exists.
        command = Process(
            "command-svc", "--listen", "127.0.0.1:0", "--event-store", POSTGRES_URL, "--postgres-schema", schema, *bus
        )
        processes.append(command)
        log = ["--event-log", f"http://{command.address}"]
        processes += [Process("projector", "--listen", "127.0.0.1:0", *bus, *documents, *log) for _ in range(2)]
        query = Process("query-svc", "--listen", "127.0.0.1:0", *documents)
        processes.append(query)
        yield command, query
        for process in processes[::-1]:
            assert process.stop() == 0, f"{process.name} did not stop cleanly"
    finally:
        for process in processes:
            if process.child.poll() is None:
                process.child.kill()
        drop_postgres_schema(schema)
        delete_rabbitmq_topology(prefix, ["projector"])


@pytest.fixture
def embedded_platform(tmp_path):
    platform = Process("scaleout", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path))
    yield platform, platform
    assert platform.stop() == 0


def scenario(pb, command_channel, query_channel):
    """The product's story: files in a folder, a rename race, concurrent
    comments, a thousand increments, then exact reads of one's own writes."""
    commands = pb.command_grpc.CommandServiceStub(command_channel)
    queries = pb.query_grpc.QueryServiceStub(query_channel)
    folder = "docs"
    files = [f"f{i}" for i in range(5)]
    versions = {}
    for file_id in files:
        result = commands.CreateFile(pb.command.CreateFileRequest(file_id=file_id, name=f"{file_id}.txt", folder_id=folder)).result
        versions[result.stream_id] = result.version

    # Two users rename f0 having both seen version 1: one wins, one is ABORTED.
    def rename(name):
        try:
            request = pb.command.RenameFileRequest(
                file_id="f0", new_name=name, expected_version=pb.common.ExpectedVersion(exact=1)
            )
            return commands.RenameFile(request).result
        except grpc.RpcError as error:
            return error

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(rename, ["alice.txt", "bob.txt"]))
    won = [o for o in outcomes if not isinstance(o, grpc.RpcError)]
    lost = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(won) == 1 and len(lost) == 1, outcomes
    assert lost[0].code() == grpc.StatusCode.ABORTED
    winner = "alice.txt" if outcomes[0] is won[0] else "bob.txt"
    versions["file-f0"] = won[0].version

    # 50 concurrent comments on f1: every one succeeds.
    def comment(i):
        return commands.AddComment(pb.command.AddCommentRequest(file_id="f1", author=f"user{i}", text=f"comment {i}")).result

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        comments = list(pool.map(comment, range(50)))
    assert sorted(r.version for r in comments) == list(range(2, 52))
    versions["file-f1"] = 51

    # 1,000 increments from 8 threads.
    def increment(_):
        return commands.IncrementCounter(pb.command.IncrementCounterRequest(counter_id="hits", request_id=str(uuid.uuid4()))).result.version

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        counter_version = max(pool.map(increment, range(1000)))
    assert counter_version == 1000

    # Read your writes: every first read is exact.
    timeout = 30
    f0 = queries.GetFile(pb.query.GetFileRequest(file_id="f0", min_version=versions["file-f0"]), timeout=timeout).file
    assert (f0.name, f0.version) == (winner, 2)
    thread = queries.ListComments(pb.query.ListCommentsRequest(file_id="f1", min_version=51), timeout=timeout)
    assert len(thread.comments) == 50
    counter = queries.GetCounter(pb.query.GetCounterRequest(counter_id="hits", min_version=counter_version), timeout=timeout)
    assert counter.count == 1000
    listing = queries.ListFolder(
        pb.query.ListFolderRequest(folder_id=folder, page_size=3, min_versions={"file-f0": versions["file-f0"]}),
        timeout=timeout,
    )
    rest = queries.ListFolder(
        pb.query.ListFolderRequest(folder_id=folder, page_size=3, page_token=listing.next_page_token), timeout=timeout
    )
    names = {entry.file_id: entry.name for entry in [*listing.files, *rest.files]}
    assert names == {"f0": winner, **{f: f"{f}.txt" for f in files[1:]}}
    assert rest.next_page_token == ""


def grpcurl(address, *args, data=None):
    command = ["grpcurl", "-plaintext", *(["-d", data] if data else []), address, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def check_with_grpcurl(command_address, query_address):
    listed = grpcurl(command_address, "list") + grpcurl(query_address, "list")
    for service in ("scaleout.v1.CommandService", "scaleout.v1.QueryService", "grpc.health.v1.Health"):
        assert service in listed, listed
    created = json.loads(
        grpcurl(
            command_address,
            "scaleout.v1.CommandService/IncrementCounter",
            data=json.dumps({"counter_id": "grpcurl", "amount": "5"}),
        )
    )
    version = created["result"]["version"]
    counter = json.loads(
        grpcurl(
            query_address,
            "scaleout.v1.QueryService/GetCounter",
            data=json.dumps({"counter_id": "grpcurl", "min_version": version}),
        )
    )
    assert counter["count"] == "5"
    for address in (command_address, query_address):
        assert '"SERVING"' in grpcurl(address, "grpc.health.v1.Health/Check")


def test_split_deployment_end_to_end(pb, split_deployment):
    command, query = split_deployment
    scenario(pb, command.channel(), query.channel())
    check_with_grpcurl(command.address, query.address)


def test_embedded_platform_end_to_end(pb, embedded_platform):
    platform, _ = embedded_platform
    channel = platform.channel()
    scenario(pb, channel, channel)
    check_with_grpcurl(platform.address, platform.address)
