"""docker-compose.yml cannot run here (no Docker engine), so check what can
be checked: it parses, every service is health-checked, every binary, flag,
environment variable and port it names exists in the code, the stateful
services keep their data in named volumes, and the Couchbase init job's script
(run against stand-ins for curl and couchbase-cli) accepts a fresh or an
already set-up cluster and fails on anything else; the certificates job's
script (run with the real openssl CLI) issues a certificate the services'
names verify against, once."""

import re
import shlex
import subprocess

import yaml

from conftest import ROOT, binary, help_text

SCALEOUT = {"command-svc", "projector", "query-svc"}


def compose():
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_every_service_is_there_and_health_checked():
    services = compose()["services"]
    assert set(services) >= {"rabbitmq", "postgres", "couchbase", "couchbase-init", "certificates", *SCALEOUT}
    for name, service in services.items():
        if service.get("restart") != "no":  # one-shot jobs end; the rest are checked
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


# Where each image documents that it keeps its state.
STATE = {
    "postgres": "/var/lib/postgresql/data",
    "rabbitmq": "/var/lib/rabbitmq",
    "couchbase": "/opt/couchbase/var",
}


def named_volume_at(compose_file, service, path):
    """The named volume (declared at the top level) mounted at `path`, if any."""
    declared = compose_file.get("volumes") or {}
    for mount in compose_file["services"][service].get("volumes", []):
        if isinstance(mount, str):
            source, _, rest = mount.partition(":")
            target = rest.split(":")[0]
        else:
            source, target = mount.get("source"), mount.get("target")
            if mount.get("type", "volume") != "volume":
                continue
        if target.rstrip("/") == path and source in declared:
            return source
    return None


def test_state_lives_in_named_volumes():
    """`docker compose down` must not lose events, messages or read models."""
    compose_file = compose()
    volumes = {service: named_volume_at(compose_file, service, path) for service, path in STATE.items()}
    for service, path in STATE.items():
        assert volumes[service], f"{service} keeps {path} in no named volume"
    assert len(set(volumes.values())) == len(volumes), f"services share a volume: {volumes}"
    services = compose_file["services"]
    # RabbitMQ's data directory is named after its node, rabbit@<hostname>: a
    # container's random hostname would leave the old data behind on recreation.
    assert services["rabbitmq"].get("hostname"), "rabbitmq needs a fixed hostname to find its data again"
    # The postgres image moved PGDATA to /var/lib/postgresql/<major>/docker in 18.
    major = int(re.match(r"postgres:(\d+)", services["postgres"]["image"]).group(1))
    assert major < 18, "postgres 18 and later keep their data under /var/lib/postgresql: move the volume"


# --- the Couchbase init job, run with stand-ins for curl and couchbase-cli -----------

CLUSTER_EXISTS = "ERROR: Cluster is already initialized, use setting-cluster to change settings"
BUCKET_EXISTS = "ERROR: name - Bucket with given name already exists"
UNREACHABLE = "ERROR: Unable to connect to host at http://couchbase:8091"


def init_script():
    """The job's shell script as compose hands it to sh: `$$` unescaped, and
    no other `$`, which compose would fill in from the host's environment."""
    service = compose()["services"]["couchbase-init"]
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    script = service["command"][0]
    assert "$" not in script.replace("$$", ""), "a `$` compose would interpolate: write `$$`"
    return script.replace("$$", "$")


def run_init(tmp_path, cluster_init, bucket_create, curl_answers=True):
    """Runs the job with couchbase-cli answering as told (exit status, output);
    returns the finished process and the couchbase-cli subcommands called."""
    stubs = tmp_path / "bin"
    stubs.mkdir(parents=True)
    calls = tmp_path / "calls"
    answers = {"cluster-init": cluster_init, "bucket-create": bucket_create}
    cases = "".join(
        f"  {command}) echo {shlex.quote(output)}; exit {status} ;;\n" for command, (status, output) in answers.items()
    )
    scripts = {
        "couchbase-cli": f'#!/bin/sh\necho "$1" >> {shlex.quote(str(calls))}\ncase "$1" in\n{cases}esac\nexit 99\n',
        "curl": f"#!/bin/sh\nexit {0 if curl_answers else 7}\n",
        "sleep": "#!/bin/sh\nexit 0\n",  # the wait loop's count, not its pace, is under test
    }
    for name, text in scripts.items():
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    done = subprocess.run(
        ["/bin/sh", "-c", init_script()],
        capture_output=True, text=True, timeout=60, env={"PATH": f"{stubs}:/usr/bin:/bin"},
    )  # fmt: skip
    called = calls.read_text().split() if calls.exists() else []
    return done, called


def test_couchbase_init_sets_up_a_fresh_cluster(tmp_path):
    done, called = run_init(tmp_path, (0, "SUCCESS: Cluster initialized"), (0, "SUCCESS: Bucket created"))
    assert done.returncode == 0, done.stderr
    assert called == ["cluster-init", "bucket-create"]


def test_couchbase_init_accepts_a_cluster_kept_in_its_volume(tmp_path):
    done, called = run_init(tmp_path, (1, CLUSTER_EXISTS), (1, BUCKET_EXISTS))
    assert done.returncode == 0, done.stderr
    assert called == ["cluster-init", "bucket-create"]
    assert "already initialized" in done.stdout and "already exists" in done.stdout


def test_couchbase_init_fails_loudly_on_anything_else(tmp_path):
    done, called = run_init(tmp_path / "a", (1, UNREACHABLE), (0, "SUCCESS: Bucket created"))
    assert done.returncode != 0 and UNREACHABLE in done.stderr
    assert called == ["cluster-init"], "went on after cluster-init failed"

    quota = "ERROR: ramQuota - RAM quota specified is too large to be provisioned into this cluster."
    done, called = run_init(tmp_path / "b", (1, CLUSTER_EXISTS), (1, quota))
    assert done.returncode != 0 and quota in done.stderr


def test_couchbase_init_gives_up_when_couchbase_never_answers(tmp_path):
    done, called = run_init(tmp_path, (0, "SUCCESS: Cluster initialized"), (0, "SUCCESS: Bucket created"), curl_answers=False)
    assert done.returncode != 0 and "did not answer" in done.stderr
    assert called == []


# --- TLS: the certificates job, and every scaleout service serving with it ------------


def test_every_scaleout_service_serves_tls_and_reads_the_log_over_it():
    services = compose()["services"]
    for name in SCALEOUT:
        service = services[name]
        environment = service["environment"]
        assert environment["SCALEOUT_TLS_CERT"] == "/certificates/server.crt", name
        assert environment["SCALEOUT_TLS_KEY"] == "/certificates/server.key", name
        assert "certificates:/certificates:ro" in service["volumes"], name
        assert service["depends_on"]["certificates"]["condition"] == "service_completed_successfully", name
    projector = services["projector"]["environment"]
    assert projector["SCALEOUT_EVENT_LOG"].startswith("https://command-svc:")
    assert projector["SCALEOUT_EVENT_LOG_CA"] == "/certificates/ca.crt"


def certificates_script():
    service = compose()["services"]["certificates"]
    assert service["entrypoint"] == ["/bin/sh", "-c"]
    script = service["command"][0]
    assert "$" not in script.replace("$$", ""), "a `$` compose would interpolate: write `$$`"
    return script.replace("$$", "$")


def test_the_certificates_job_issues_a_certificate_for_every_service_once(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    chowned = tmp_path / "chowned"
    # chown needs root: record what the job hands to uid 10001 instead.
    (stubs / "chown").write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(chowned))}\n')
    (stubs / "chown").chmod(0o755)
    volume = tmp_path / "certificates"
    volume.mkdir()

    def run():
        return subprocess.run(
            ["/bin/sh", "-c", certificates_script()], capture_output=True, text=True, timeout=60,
            env={"PATH": f"{stubs}:/usr/bin:/bin", "CERTIFICATES": str(volume)},
        )  # fmt: skip

    first = run()
    assert first.returncode == 0, first.stderr
    assert sorted(p.name for p in volume.iterdir()) == ["ca.crt", "server.crt", "server.key"]
    assert (volume / "server.key").stat().st_mode & 0o777 == 0o600
    assert chowned.read_text().split() == ["10001:10001", "server.key"]
    for name in ["command-svc", "projector", "query-svc", "localhost"]:
        verified = subprocess.run(
            ["openssl", "verify", "-CAfile", "ca.crt", "-verify_hostname", name, "server.crt"],
            cwd=volume, capture_output=True, text=True,
        )  # fmt: skip
        assert verified.returncode == 0, f"{name}: {verified.stdout}{verified.stderr}"
    issued = (volume / "server.crt").read_bytes()
    second = run()
    assert second.returncode == 0 and "kept" in second.stdout, second.stderr
    assert (volume / "server.crt").read_bytes() == issued

