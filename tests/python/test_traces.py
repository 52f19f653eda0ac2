"""A Python client traced with the OpenTelemetry SDK: the trace context its
propagator injects is honoured by the shipped embedded platform, which
exports its spans over OTLP/gRPC to a collector served here with the
`opentelemetry-proto` stubs. The command, its events, the projector's
document write and the query that waited for it all land in the client's
trace."""

import threading
from concurrent import futures

import grpc
from opentelemetry import propagate, trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

from processes import Process


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span it is sent, with the service that sent it."""

    def __init__(self):
        self.spans = []
        self.lock = threading.Lock()

    def Export(self, request, context):
        with self.lock:
            for resource in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource.resource.attributes if a.key == "service.name"), ""
                )
                for scope in resource.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_a_python_clients_trace_runs_through_the_platform(pb, tmp_path):
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    platform = Process(
        "scaleout", "--listen", "127.0.0.1:0", "--data-dir", str(tmp_path),
        "--otlp-endpoint", f"http://127.0.0.1:{port}",
    )
    try:
        tracer = TracerProvider().get_tracer("python-client")
        channel = platform.channel()
        commands = pb.command_grpc.CommandServiceStub(channel)
        queries = pb.query_grpc.QueryServiceStub(channel)
        with tracer.start_as_current_span("increment and read back") as span:
            context = span.get_span_context()
            carrier = {}
            propagate.inject(carrier)
            metadata = tuple(carrier.items())
            assert [key for key, _ in metadata] == ["traceparent"]
            written = commands.IncrementCounter(
                pb.command.IncrementCounterRequest(counter_id="py-traced"), metadata=metadata, timeout=10
            ).result
            counter = queries.GetCounter(
                pb.query.GetCounterRequest(counter_id="py-traced", min_version=written.version),
                metadata=metadata,
                timeout=30,
            )
            assert counter.count == 1

        # The event carries the client's trace and, naming no correlation
        # id of its own, is correlated by it.
        reader = pb.read_grpc.ReadServiceStub(channel)
        event = reader.ReadAll(pb.read.ReadAllRequest(limit=10), timeout=10).events[0].event
        trace_id = trace.format_trace_id(context.trace_id)
        assert event.traceparent.startswith(f"00-{trace_id}-"), event.traceparent
        assert event.correlation_id.replace("-", "") == trace_id
    finally:
        # Stopping flushes the platform's last spans.
        assert platform.stop() == 0
        server.stop(None)

    spans = [(service, s) for service, s in collector.spans if s.trace_id == context.trace_id.to_bytes(16, "big")]
    by_id = {s.span_id: s for _, s in spans}
    names = {s.name for _, s in spans}
    for name in ["scaleout.v1.CommandService/IncrementCounter", "command", "decide", "append",
                 "project", "write document", "scaleout.v1.QueryService/GetCounter", "read view"]:
        assert name in names, f"no {name!r} span in the client's trace: {sorted(names)}"
    assert {service for service, _ in spans} == {"scaleout"}

    def chain(name):
        span = next(s for _, s in spans if s.name == name)
        names = [span.name]
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            names.append(span.name)
        return names, span.parent_span_id

    client_span = context.span_id.to_bytes(8, "big")
    # The embedded platform's projector follows the log: no bus in between.
    assert chain("write document") == (
        ["write document", "project", "append", "command", "scaleout.v1.CommandService/IncrementCounter"],
        client_span,
    )
    assert chain("read view") == (["read view", "scaleout.v1.QueryService/GetCounter"], client_span)
