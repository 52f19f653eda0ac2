"""The Docker image's runtime stage, without a Docker engine.

No Docker engine runs here, so this builds the root filesystem the
Dockerfile's runtime stage would hold: a Debian root of the stage's suite,
made by mmdebstrap with only the packages the stage's `apt-get install`
names (read from the Dockerfile, so the two cannot drift). Its base is
mmdebstrap's `apt` variant (Essential packages and apt), a subset of
`debian:<suite>-slim` (debootstrap's minbase, slimmed), so whatever runs here
has no more to go on than in the image. The workspace's debug binaries are put
where the stage's COPY puts them, and each runs in the root with `chroot` as
the stage's USER, with /proc mounted (in a mount namespace of its own, gone when
it exits) and the host's network: each answers `--help`, finds every library
it links inside the root, serves, and reports SERVING to its own
`--check-health`, the image's health check.

Not proved: that `docker build` succeeds (the release build in the build stage,
the COPY paths), that compose starts (test_compose.py checks its names), or
anything about Couchbase Server (query-svc and the projector serve a redb
store here). The embedded `scaleout` binary is not in the image; it runs here
to show that it would.

Needs root (mmdebstrap, chroot, mount) and, the first time, the Debian mirror:
the root is kept in target/image-root-<hash of its recipe> (~180 MB, up to a
minute to build), rebuilt only when the recipe changes (delete it for newer
Debian packages).
"""

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time

import pytest

from conftest import ROOT, TARGET, binary
from processes import RABBITMQ_URL, Process, delete_rabbitmq_topology, unique

DOCKERFILE = ROOT / "Dockerfile"
VARIANT = "apt"
EMBEDDED = "scaleout"  # the all-in-one binary: run here too, though the image has no copy
# What a container gets from Docker besides the image's ENV.
ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/"}
HEALTHY_WITHIN = 30  # seconds
TOOLS = {name: shutil.which(name, path=ENV["PATH"]) for name in ("chroot", "mount", "unshare", "mmdebstrap")}


# --- what the Dockerfile's runtime stage does ---------------------------------


def instructions(text):
    """(INSTRUCTION, arguments) per Dockerfile instruction: continuations
    joined, comments dropped (inside a continuation too, as Docker does)."""
    result, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        keyword, _, arguments = (current + stripped).partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return result


def shell_commands(command):
    """A RUN line's simple commands (split at `&&` and `;`), each a word list."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words = [], []
    for token in lexer:
        if token in ("&&", ";"):
            commands.append(words)
            words = []
        else:
            assert set(token) - set("|&;<>()"), f"RUN {command!r}: this test only follows `&&` and `;`"
            words.append(token)
    return [*commands, words]


def suite_of(image, pattern):
    found = re.fullmatch(pattern, image.split(" ")[0])
    assert found, f"FROM {image}: this test knows only Debian images ({pattern})"
    return found.group(1)


@dataclasses.dataclass
class RuntimeStage:
    suite: str  # the Debian release of the base image
    build_suite: str  # the one the build stage compiles on
    packages: list  # what its apt-get install adds, in order
    install_options: list
    lists_removed: bool  # whether the RUN that installs also drops /var/lib/apt/lists
    uid: int  # its USER
    binaries: list  # what its COPY --from=build puts in the image
    binary_dir: str  # where


def runtime_stage():
    stages = []
    for keyword, arguments in instructions(DOCKERFILE.read_text()):
        if keyword == "FROM":
            stages.append([])
        stages[-1].append((keyword, arguments))
    assert len(stages) >= 2, "the Dockerfile has no separate runtime stage"
    build_suite = suite_of(stages[0][0][1], r"rust:[\d.]+-([a-z]+)")
    suite = suite_of(stages[-1][0][1], r"debian:([a-z]+)(?:-slim)?")

    packages, options, lists_removed, users, user, binaries, binary_dir = [], [], False, {}, None, [], None
    for keyword, arguments in stages[-1][1:]:
        if keyword == "RUN":
            installs = False
            for words in shell_commands(arguments):
                if words[:2] == ["apt-get", "update"]:
                    pass
                elif words[:2] == ["apt-get", "install"]:
                    installs = True
                    options += [w for w in words[2:] if w.startswith("-")]
                    packages += [w for w in words[2:] if not w.startswith("-")]
                elif words == ["rm", "-rf", "/var/lib/apt/lists/*"]:
                    lists_removed = lists_removed or installs
                elif words[0] == "useradd" and "--uid" in words:
                    users[words[-1]] = int(words[words.index("--uid") + 1])
                else:
                    raise AssertionError(f"RUN {arguments!r}: test_image.py cannot reproduce {words!r}; teach it")
        elif keyword == "USER":
            user = arguments
        elif keyword == "COPY" and arguments.startswith("--from=build "):
            *sources, binary_dir = arguments.split()[1:]
            binaries += [source.rsplit("/", 1)[1] for source in sources]
        elif keyword not in ("EXPOSE", "LABEL", "ENTRYPOINT", "CMD", "HEALTHCHECK"):  # none changes what runs here
            raise AssertionError(f"{keyword} {arguments}: test_image.py cannot reproduce it; teach it")
    assert user is not None, "the runtime stage runs as root (no USER)"
    uid = int(user) if user.isdigit() else users.get(user)
    assert uid is not None, f"USER {user} is not made with `useradd --uid` in the runtime stage"
    assert binaries and binary_dir, "the runtime stage copies no binaries from the build stage"
    return RuntimeStage(suite, build_suite, packages, options, lists_removed, uid, binaries, binary_dir)


def test_the_runtime_stage_installs_only_what_it_names():
    """mmdebstrap installs no Recommends, so the root equals the stage only if
    the stage does not either; and the image keeps no package lists."""
    stage = runtime_stage()
    assert stage.packages, "the runtime stage installs nothing: projector and query-svc link libssl.so.3"
    assert "--no-install-recommends" in stage.install_options
    assert "-y" in stage.install_options
    assert stage.lists_removed, "the RUN that installs packages must also rm -rf /var/lib/apt/lists/*"


# --- the root: built once per recipe, kept under target/ -----------------------


class ImageRoot:
    """The runtime stage's root with the workspace's binaries in it."""

    def __init__(self, path, stage):
        self.path = path
        self.stage = stage
        self.binary_dir = stage.binary_dir.rstrip("/") + "/"

    def launch(self, name):
        """The command line that runs `name` in the root as the stage's USER,
        with /proc mounted in a mount namespace of its own (gone with it); the
        last process execs the binary, so its pid is the binary's."""
        mount, chroot = shlex.quote(TOOLS["mount"]), shlex.quote(TOOLS["chroot"])
        script = (
            f'root=$1 user=$2; shift 2; {mount} -t proc proc "$root/proc"'
            f' && exec {chroot} --userspec="$user" "$root" "$@"'
        )
        userspec = f"{self.stage.uid}:{self.stage.uid}"
        return [
            TOOLS["unshare"], "--mount", "--propagation", "private", "--",
            "sh", "-c", script, "sh", str(self.path), userspec, self.binary_dir + name,
        ]  # fmt: skip

    def run(self, name, *args, timeout=30):
        return subprocess.run(
            [*self.launch(name), *args], capture_output=True, text=True, env=ENV, timeout=timeout
        )

    def serve(self, name, *args):
        process = Process(name, "--listen", "127.0.0.1:0", *args, launch=self.launch(name), env=ENV)
        try:
            self.assert_runs_inside(process)
        except BaseException:
            process.child.kill()
            raise
        return process

    def assert_runs_inside(self, process):
        """The process's root is ours, it runs as the stage's USER, and every
        shared object it mapped comes from the root, none from the host."""
        pid = process.child.pid
        assert os.path.realpath(f"/proc/{pid}/root") == str(self.path)
        status = dict(line.partition(":")[::2] for line in open(f"/proc/{pid}/status").read().splitlines())
        uid = status["Uid"].split()[0]
        assert uid == str(self.stage.uid), f"{process.name} runs as uid {uid}, not the stage's USER"
        mapped = {line.split()[5] for line in open(f"/proc/{pid}/maps") if len(line.split()) >= 6}
        objects = {path for path in mapped if ".so" in os.path.basename(path)}
        assert objects, f"{process.name} maps no shared objects"
        outside = sorted(path for path in objects if not path.startswith(f"{self.path}/"))
        assert not outside, f"{process.name} loaded libraries from outside the root: {outside}"

    def check_health(self, process, within=HEALTHY_WITHIN):
        """Runs the image's health check (`--check-health` in the root) until it
        says SERVING, within a deadline."""
        deadline = time.monotonic() + within
        while True:
            check = self.run(process.name, "--listen", process.address, "--check-health", timeout=15)
            if check.returncode == 0:
                return
            assert process.child.poll() is None, f"{process.name} exited ({process.child.returncode})"
            assert time.monotonic() < deadline, (
                f"{process.name} not SERVING within {within}s: {check.returncode} {check.stdout}{check.stderr}"
            )
            time.sleep(0.2)

    def stop(self, process):
        assert process.stop() == 0, f"{process.name} did not stop cleanly"
        # The check really asked that server: with it gone, it fails.
        after = self.run(process.name, "--listen", process.address, "--check-health", timeout=15)
        assert after.returncode != 0, f"{process.name} --check-health passes with nothing listening"


def recipe(stage):
    """Everything the root is made of; its hash names the cached root."""
    mirrors = [
        f"deb http://deb.debian.org/debian {stage.suite} main",
        f"deb http://deb.debian.org/debian {stage.suite}-updates main",
        f"deb http://deb.debian.org/debian-security {stage.suite}-security main",
    ]
    return {"suite": stage.suite, "variant": VARIANT, "packages": stage.packages, "mirrors": mirrors}


def build_root(stage):
    """The cached root for this recipe, built when missing (under a lock, into
    a scratch directory renamed when complete; older roots are deleted)."""
    made = recipe(stage)
    key = hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:16]
    path = TARGET / f"image-root-{key}"
    TARGET.mkdir(parents=True, exist_ok=True)
    with open(TARGET / "image-root.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.is_dir():
            partial = TARGET / f"image-root-{key}.partial"
            shutil.rmtree(partial, ignore_errors=True)  # an interrupted build's
            log = TARGET / f"image-root-{key}.log"
            command = [TOOLS["mmdebstrap"], f"--variant={VARIANT}", "--mode=root", "--format=directory"]
            if made["packages"]:
                command.append("--include=" + ",".join(made["packages"]))
            command += [made["suite"], str(partial), *made["mirrors"]]
            with open(log, "w") as out:
                built = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=900)
            if built.returncode != 0:
                shutil.rmtree(partial, ignore_errors=True)
                raise AssertionError(f"mmdebstrap failed ({built.returncode}):\n{log.read_text()[-3000:]}")
            os.rename(partial, path)
            log.unlink()
            for stale in TARGET.glob("image-root-*"):
                if stale.is_dir() and stale != path:
                    shutil.rmtree(stale)
    return path


@pytest.fixture(scope="module")
def image_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: mmdebstrap, chroot and mount (CI runs as root)")
    stage = runtime_stage()
    host = dict(
        line.split("=", 1) for line in open("/etc/os-release").read().splitlines() if "=" in line
    ).get("VERSION_CODENAME")
    if host != stage.build_suite:
        pytest.skip(f"the binaries here are built on {host}, the image's on {stage.build_suite}: not the same libraries")
    missing = [tool for tool, path in TOOLS.items() if path is None]
    assert not missing, f"{missing} not installed: scripts/test.sh installs mmdebstrap (apt-get install mmdebstrap)"

    root = ImageRoot(build_root(stage), stage)
    installed = subprocess.run(
        ["dpkg-query", f"--admindir={root.path}/var/lib/dpkg", "-W", "-f", "${Package} ${Status}\n", *stage.packages],
        capture_output=True, text=True,
    )  # fmt: skip
    for package in stage.packages:
        assert f"{package} install ok installed" in installed.stdout, f"{package} is not in the root"

    # Put the binaries where the stage's COPY does: the image's three, and the embedded one.
    directory = root.path / stage.binary_dir.strip("/")
    placed = []
    try:
        for name in [*stage.binaries, EMBEDDED]:
            target = directory / name
            target.unlink(missing_ok=True)
            try:
                os.link(binary(name), target)
            except OSError:
                shutil.copy2(binary(name), target)
            placed.append(target)
        yield root
    finally:
        for target in placed:
            target.unlink(missing_ok=True)


@pytest.fixture
def scratch(image_root):
    """A directory in the root's /tmp that the stage's USER owns: its path
    inside the root."""
    path = tempfile.mkdtemp(prefix="test-image-", dir=image_root.path / "tmp")
    os.chown(path, image_root.stage.uid, image_root.stage.uid)
    yield "/tmp/" + os.path.basename(path)
    shutil.rmtree(path)


def names():
    return [*runtime_stage().binaries, EMBEDDED]


# --- the binaries in the root ------------------------------------------------------


@pytest.mark.parametrize("name", names())
def test_every_library_a_binary_links_is_in_the_root(image_root, name):
    ldd = subprocess.run(
        [TOOLS["chroot"], str(image_root.path), "/usr/bin/ldd", image_root.binary_dir + name],
        capture_output=True, text=True, env=ENV, timeout=30,
    )  # fmt: skip
    assert ldd.returncode == 0, ldd.stderr
    assert "not found" not in ldd.stdout, f"{name} in the image:\n{ldd.stdout}"


@pytest.mark.parametrize("name", names())
def test_every_binary_answers_help(image_root, name):
    helped = image_root.run(name, "--help")
    assert helped.returncode == 0, f"{name} --help: {helped.returncode}\n{helped.stdout}{helped.stderr}"
    assert f"Usage: {name} [OPTIONS]" in helped.stdout
    assert "--check-health" in helped.stdout


@contextlib.contextmanager
def serving(image_root, processes, name, *args):
    """Serves `name` in the root until it reports SERVING; stops it cleanly
    after the block (killed if the block failed)."""
    process = image_root.serve(name, *args)
    processes.append(process)
    image_root.check_health(process)
    yield process
    image_root.stop(process)


@pytest.fixture
def processes():
    started = []
    yield started
    for process in started:
        if process.child.poll() is None:
            process.child.kill()
            process.child.wait(timeout=10)


def test_command_svc_serves_and_is_healthy(image_root, scratch, processes):
    with serving(image_root, processes, "command-svc", "--event-store", f"redb:{scratch}/events.redb"):
        pass


def test_query_svc_serves_and_is_healthy(image_root, scratch, processes):
    with serving(image_root, processes, "query-svc", "--document-store", f"redb:{scratch}/views.redb"):
        pass


def test_embedded_platform_serves_and_is_healthy(image_root, scratch, processes):
    with serving(image_root, processes, EMBEDDED, "--data-dir", f"{scratch}/data"):
        pass


def test_projector_serves_and_is_healthy_on_rabbitmq(image_root, scratch, processes):
    """The projector is healthy only when the bus, its document store and the
    event log (a command-svc, in the root too) all answer."""
    import pika
    import pika.exceptions

    prefix = unique("image").replace("_", "-")
    try:
        with serving(image_root, processes, "command-svc", "--event-store", f"redb:{scratch}/events.redb") as command:
            with serving(
                image_root, processes, "projector",
                "--event-bus", RABBITMQ_URL, "--event-bus-prefix", prefix,
                "--document-store", f"redb:{scratch}/views.redb",
                "--event-log", f"http://{command.address}",
                "--health-interval", "250ms",
            ):  # fmt: skip
                # It reached the broker from inside the root: its queue appears
                # (declared by its worker, which health does not wait for).
                queue = f"{prefix}.projector"
                connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
                try:
                    deadline = time.monotonic() + 10
                    while True:
                        try:
                            connection.channel().queue_declare(queue, passive=True)
                            break
                        except pika.exceptions.ChannelClosedByBroker as missing:  # 404 closes the channel
                            assert time.monotonic() < deadline, f"no queue {queue} within 10s: {missing}"
                            time.sleep(0.1)
                finally:
                    connection.close()
    finally:
        for process in processes:  # before the topology goes, or it would declare it again
            if process.child.poll() is None:
                process.child.kill()
                process.child.wait(timeout=10)
        delete_rabbitmq_topology(prefix, ["projector"])
