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


def read_the_log(pb, channel):
    """The event log through the generated client: the whole log in pages,
    one stream, then a subscription that catches up and follows a new event."""
    reader = pb.read_grpc.ReadServiceStub(channel)
    commands = pb.command_grpc.CommandServiceStub(channel)
    events, position = [], 0
    while True:
        page = reader.ReadAll(pb.read.ReadAllRequest(from_position=position, limit=1000))
        events += page.events
        position = page.next_position
        if position > page.head_position:
            break
    assert [e.position for e in events] == list(range(1, len(events) + 1))
    hits = [e.event for e in events if e.event.stream_id == "counter-hits"]
    assert [e.version for e in hits] == list(range(1, 1001))
    stream = reader.ReadStream(pb.read.ReadStreamRequest(stream_id="file-f1", from_version=2, limit=10))
    assert [e.event.version for e in stream.events] == list(range(2, 12)) and not stream.end_of_stream

    subscription = reader.Subscribe(
        pb.read.SubscribeRequest(from_position=len(events) - 4, filter=pb.read.LogFilter(stream_types=["counter"])),
        timeout=30,
    )
    seen = []
    for message in subscription:
        if message.HasField("event"):
            seen.append(message.event.position)
            if message.event.event.stream_id == "counter-live":
                break
        elif message.checkpoint.caught_up and not any(p > len(events) for p in seen):
            commands.IncrementCounter(pb.command.IncrementCounterRequest(counter_id="live"))
    subscription.cancel()
    assert seen[0] >= len(events) - 4 and seen == sorted(seen) and seen[-1] > len(events)

    with pytest.raises(grpc.RpcError) as refused:
        reader.ReadAll(pb.read.ReadAllRequest(limit=5000))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "1000" in refused.value.details()


def grpcurl(address, *args, data=None):
    command = ["grpcurl", "-plaintext", *(["-d", data] if data else []), address, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def check_with_grpcurl(command_address, query_address):
    listed = grpcurl(command_address, "list") + grpcurl(query_address, "list")
    for service in ("scaleout.v1.CommandService", "scaleout.v1.QueryService", "scaleout.v1.ReadService", "grpc.health.v1.Health"):
        assert service in listed, listed
    logged = json.loads(grpcurl(command_address, "scaleout.v1.ReadService/ReadAll", data=json.dumps({"limit": 2})))
    assert [e["position"] for e in logged["events"]] == ["1", "2"]
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
    read_the_log(pb, command.channel())
    check_with_grpcurl(command.address, query.address)


def test_embedded_platform_end_to_end(pb, embedded_platform):
    platform, _ = embedded_platform
    channel = platform.channel()
    scenario(pb, channel, channel)
    read_the_log(pb, channel)
    check_with_grpcurl(platform.address, platform.address)
