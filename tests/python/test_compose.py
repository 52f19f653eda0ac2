"""docker-compose.yml cannot run here (no Docker engine), so check what can
be checked: it parses, every service is health-checked, and every binary,
flag, environment variable and port it names exists in the code."""

import re

import yaml

from conftest import ROOT, binary, help_text

SCALEOUT = {"command-svc", "projector", "query-svc"}


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_service_is_there_and_health_checked():
    services = compose()["services"]
    assert set(services) >= {"rabbitmq", "postgres", "couchbase", "couchbase-init", *SCALEOUT}
    for name, service in services.items():
        if name != "couchbase-init":
            assert "healthcheck" in service, f"{name} has no health check"
    assert services["projector"]["deploy"]["replicas"] == 2
    init = services["couchbase-init"]["command"][0]
    assert "cluster-init" in init and "bucket-create" in init and "--wait" in init


def test_scaleout_services_name_only_flags_and_variables_that_exist():
    services = compose()["services"]
    for name in SCALEOUT:
        service = services[name]
        program = service["command"][0]
        binary(program)  # built by the workspace
        text = help_text(program)
        for variable in service["environment"]:
            if variable.startswith("SCALEOUT_"):
                assert f"[env: {variable}" in text, f"{name}: {program} has no {variable}"
        for flag in (arg for arg in service["healthcheck"]["test"] if arg.startswith("--")):
            assert re.search(rf"\s{re.escape(flag)}\b", text), f"{name}: {program} has no {flag}"


def test_published_ports_are_the_ports_services_listen_on():
    services = compose()["services"]
    for name, listen_variable in [("command-svc", "SCALEOUT_COMMAND_LISTEN"), ("query-svc", "SCALEOUT_QUERY_LISTEN")]:
        listen_port = services[name]["environment"][listen_variable].rsplit(":", 1)[1]
        published = [p.split(":")[1] for p in services[name]["ports"]]
        assert listen_port in published, f"{name} listens on {listen_port} but publishes {published}"
        check = services[name]["healthcheck"]["test"]
        assert services[name]["environment"][listen_variable] in check


def test_the_dockerfile_builds_every_binary_compose_runs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for program in SCALEOUT:
        assert f"-p {program}" in dockerfile and f"release/{program}" in dockerfile
