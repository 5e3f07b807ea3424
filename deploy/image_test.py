"""``make image-test``: build the images, run them as README.md says, and check what a user relies on.

    python -m deploy.image_test [--train] [--keep-daemon]

Checks, against the serving image built from this checkout:

- the classic builder (``DOCKER_BUILDKIT=0``) stops at once, saying that BuildKit is needed;
- ``docker run -v CHECKPOINT:/models/reward:ro``: /readyz 200, the ONNX Runtime forward (/info), uid 10001, no
  entry point that cannot run (``reward-train`` and ``reward-eval`` need the train image), /score equal to this
  machine's in-process service within 1e-5, /metrics;
- a checkpoint whose weights only their owner may read: the container exits 1, naming the file and the fix;
- ``serve-baked`` with such a checkpoint baked in: serves;
- ``docker stop`` under more in-flight work than the drain timeout allows: every request answered (200, or 503 with
  Retry-After for what did not fit), exit 0 within the drain timeout;
- with ``--train``: the train image trains on the demo pairs into a mounted folder, as docs/deploy.md says, and the
  serving image serves that checkpoint with the host's scores.

It uses Debian's ``docker`` client with ``DOCKER_BUILDKIT=1`` (installing ``docker.io`` with apt-get when there is no
docker), starts ``dockerd`` when none runs (and stops what it started). Where Docker Hub and the PyPI torch index are
reachable it builds with the Dockerfile's defaults; where they are not, it makes the base image from Debian's archive
(``debootstrap``, the host's CA certificates added) and serves the pinned torch wheels from a local PEP 503 index
(``pip download``), passing both as build arguments with ``--network host``. The base, the wheels and Docker's build
cache are kept (``.image-test/``, Docker's own storage), so a second run rebuilds only what changed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import html
import http.server
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".image-test"
CHECKPOINTS = ROOT / "checkpoints" / "image-test"  # inside the build context, for serve-baked
SERVE_TAG = "reward-service:image-test"
BAKED_TAG = "reward-service:image-test-baked"
TRAIN_TAG = "reward-service-train:image-test"
LOCAL_BASE = "reward-image-test/python:3.11-bookworm"
DEBIAN_SUITE = "bookworm"  # its python3 is 3.11, as the Dockerfile's default base
IMAGE_UID = "10001"
TORCH_INDEX_PORT = 38147
READY_TIMEOUT_S = 300
TOLERANCE = 1e-5
DRAIN_TIMEOUT_S = 4
STOP_TIMEOUT_S = DRAIN_TIMEOUT_S + 20
TEXTS = [
    {"prompt": "What is 2+2?", "response": "4"},
    {"prompt": "Say something kind.", "response": "You are doing a great job, thank you."},
    {"text": "the quick brown fox jumps over the lazy dog"},
    {"prompt": "Tell me about rivers.", "response": "A river is a natural stream of water flowing to the sea."},
]


class Failed(Exception):
    """A check failed; the message says which and what was seen."""


def log(message: str) -> None:
    print(f"[image-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def check(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


# -- tools and the daemon ------------------------------------------------------------------------------------------
def apt_install(*packages: str) -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Failed(f"{' '.join(packages)} missing, and apt-get cannot install them here (needs root and apt)")
    log(f"apt-get install {' '.join(packages)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env, stdout=subprocess.DEVNULL)


def docker_client() -> str:
    """Debian's docker client: it builds with BuildKit (DOCKER_BUILDKIT=1) without the buildx plugin, which newer
    clients require for that."""
    if not Path("/usr/bin/docker").exists() or not shutil.which("dockerd"):
        apt_install("docker.io")
    return "/usr/bin/docker"


def docker_env(buildkit: bool = True) -> dict[str, str]:
    return {**os.environ, "DOCKER_BUILDKIT": "1" if buildkit else "0"}


def docker(*args: str, check_: bool = True, capture: bool = True, timeout: float | None = None, **kw):
    proc = subprocess.run(
        [DOCKER, *args], capture_output=capture, text=True, env=kw.pop("env", docker_env()), timeout=timeout, **kw
    )
    if check_ and proc.returncode != 0:
        raise Failed(f"docker {' '.join(args[:3])} ... exited {proc.returncode}:\n{(proc.stdout or '')[-3000:]}"
                     f"{(proc.stderr or '')[-3000:]}")  # fmt: skip
    return proc


def daemon_running() -> bool:
    return subprocess.run([DOCKER, "info"], capture_output=True, env=docker_env()).returncode == 0


@contextlib.contextmanager
def docker_daemon(keep: bool) -> Iterator[None]:
    """A running dockerd: the one already there, or one started here and stopped at the end (unless ``keep``)."""
    if daemon_running():
        yield
        return
    CACHE.mkdir(exist_ok=True)
    log("starting dockerd")
    with open(CACHE / "dockerd.log", "ab") as out:
        proc = subprocess.Popen(["dockerd"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not daemon_running():
            check(proc.poll() is None, f"dockerd exited with {proc.returncode}; see {CACHE / 'dockerd.log'}")
            check(time.monotonic() < deadline, "dockerd did not answer within 60 s")
            time.sleep(0.5)
        yield
    finally:
        if not keep and proc.poll() is None:
            log("stopping the dockerd started here")
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def reachable(url: str) -> bool:
    try:
        httpx.get(url, timeout=5)
    except httpx.HTTPError:
        return False
    return True


def registries_reachable() -> bool:
    return reachable("https://registry-1.docker.io/v2/") and reachable("https://download.pytorch.org/whl/cpu/")


# -- without a registry: the base image and the torch index --------------------------------------------------------
def image_exists(tag: str) -> bool:
    return docker("image", "inspect", tag, check_=False).returncode == 0


def local_base_image() -> str:
    """python3 on Debian from its archive (debootstrap), with the host's CA certificates, imported as an image."""
    if image_exists(LOCAL_BASE):
        return LOCAL_BASE
    if not shutil.which("debootstrap"):
        apt_install("debootstrap")
    tarball = CACHE / "rootfs.tar"
    if not tarball.exists():
        rootfs = CACHE / "rootfs"
        shutil.rmtree(rootfs, ignore_errors=True)
        started = time.perf_counter()
        log(f"debootstrap {DEBIAN_SUITE} (python3, python3-venv) into {rootfs}")
        subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates", DEBIAN_SUITE,
             str(rootfs), "http://deb.debian.org/debian"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        (rootfs / "usr/bin/python").symlink_to("python3")
        # This machine's network may present certificates only its own trust store knows (a proxy's CA): without
        # them pip inside the build cannot reach PyPI.
        extra = rootfs / "usr/local/share/ca-certificates/host"
        extra.mkdir(parents=True, exist_ok=True)
        bundle = Path("/etc/ssl/certs/ca-certificates.crt").read_text()
        for i, pem in enumerate(re.findall(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", bundle, re.S)):
            (extra / f"host-{i:03d}.crt").write_text(pem + "\n")
        subprocess.run(["chroot", str(rootfs), "update-ca-certificates"], check=True, stdout=subprocess.DEVNULL)
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (rootfs / cache).glob("*"):
                if item.is_file():
                    item.unlink()
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
        shutil.rmtree(rootfs)
        log(f"base root filesystem made in {time.perf_counter() - started:.0f} s")
    docker(
        "import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change", "ENV LANG=C.UTF-8", str(tarball), LOCAL_BASE,
    )  # fmt: skip
    return LOCAL_BASE


def dockerfile_arg(name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    check(match is not None, f"the Dockerfile has no ARG {name}")
    return match.group(1)  # type: ignore[union-attr]


def torch_wheels() -> Path:
    """The pinned CPU torch wheel and its dependencies, for the base's Python (3.11, manylinux x86-64)."""
    wheels = CACHE / "index" / "wheels"
    version = dockerfile_arg("TORCH_VERSION")
    if not any(wheels.glob(f"torch-{version}*.whl")):
        wheels.mkdir(parents=True, exist_ok=True)
        log(f"pip download torch=={version} and its dependencies")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--python-version", "3.11",
             "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
             "-d", str(wheels), f"torch=={version}+cpu"],
            check=True,
        )  # fmt: skip
    return wheels


def write_simple_index(wheels: Path) -> Path:
    """A PEP 503 index over ``wheels``: ``simple/<project>/`` lists its files with their sha256."""
    from packaging.utils import parse_wheel_filename

    simple = wheels.parent / "simple"
    shutil.rmtree(simple, ignore_errors=True)
    projects: dict[str, list[Path]] = {}
    for wheel in sorted(wheels.glob("*.whl")):
        projects.setdefault(parse_wheel_filename(wheel.name)[0], []).append(wheel)
    for project, files in projects.items():
        links = "".join(
            f'<a href="../../wheels/{html.escape(f.name)}#sha256={hashlib.sha256(f.read_bytes()).hexdigest()}">'
            f"{html.escape(f.name)}</a>\n"
            for f in files
        )
        (simple / project).mkdir(parents=True)
        (simple / project / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
    return simple


@contextlib.contextmanager
def torch_index() -> Iterator[str]:
    simple = write_simple_index(torch_wheels())
    handler = functools.partial(_QuietHandler, directory=str(simple.parent))
    # A fixed port: the URL is a build argument of the torch layer, so a new one would rebuild every layer after it.
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", TORCH_INDEX_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple"
    finally:
        server.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


# -- building ------------------------------------------------------------------------------------------------------
def build(target: str, tag: str, build_args: dict[str, str], network_host: bool, timings: dict[str, float]) -> None:
    argv = ["build", "--target", target, "-t", tag, "--progress", "plain"]
    if network_host:
        argv += ["--network", "host"]
    for key, value in build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    log(f"building {target} ({tag})")
    started = time.perf_counter()
    proc = docker(*argv, ".", cwd=ROOT, check_=False)
    timings[target] = time.perf_counter() - started
    if proc.returncode != 0:
        raise Failed(f"building {target} failed after {timings[target]:.0f} s:\n{proc.stderr[-5000:]}")
    log(f"built {target} in {timings[target]:.0f} s, {image_size(tag) / 1e6:.0f} MB")


def check_classic_builder_fails_fast(build_args: dict[str, str], network_host: bool) -> None:
    """Without BuildKit the first stage stops the build, saying why, instead of building every stage."""
    argv = ["build", "-t", "reward-service:image-test-classic"] + (["--network", "host"] if network_host else [])
    for key, value in build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    started = time.perf_counter()
    proc = docker(*argv, ".", cwd=ROOT, check_=False, env=docker_env(buildkit=False), timeout=600)
    elapsed = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    if "legacy builder is deprecated" in output and "removed" in output:
        log("this docker has no classic builder: nothing to check")
        return
    check(proc.returncode != 0, "the classic builder built the image: the BuildKit guard did not stop it")
    check(
        "needs BuildKit" in output, f"the classic builder failed without saying BuildKit is needed:\n{output[-2000:]}"
    )
    check(elapsed < 120, f"the classic builder took {elapsed:.0f} s to fail; the guard should stop it at once")
    log(f"classic builder: stopped after {elapsed:.1f} s, saying BuildKit is needed")


def image_size(tag: str) -> int:
    return int(docker("image", "inspect", "-f", "{{.Size}}", tag).stdout.strip())


def report_contents(tag: str) -> None:
    history = docker("history", "--format", "{{.Size}}\t{{.CreatedBy}}", tag).stdout.splitlines()
    log("largest layers:\n" + "\n".join(f"  {line[:150]}" for line in history if not line.startswith("0B"))[:3000])
    du = docker(
        "run", "--rm", "--entrypoint", "sh", tag, "-c",
        "du -sm /opt/venv; du -sm /opt/venv/lib/python3*/site-packages/* | sort -rn | head -10",
    ).stdout  # fmt: skip
    log("inside (MB):\n" + "\n".join(f"  {line}" for line in du.splitlines()))


# -- checkpoints and the host's scores -----------------------------------------------------------------------------
def make_checkpoints() -> tuple[Path, Path, Path]:
    """Random BERT reward models, readable by everyone: a tiny one, and a slower one (4 layers of 256) under which
    a drain can be seen mid-way; and a copy of the tiny one whose weights only their owner (another uid) may
    read, as safetensors writes them."""
    from bench.tiny import make_tiny_bert
    from training.checkpoint import share_checkpoint

    shared, slow, private = CHECKPOINTS / "model", CHECKPOINTS / "slow", CHECKPOINTS / "owner-only"
    if not (shared / "model.safetensors").exists() or not (slow / "model.safetensors").exists():
        shutil.rmtree(CHECKPOINTS, ignore_errors=True)
        make_tiny_bert(shared, manifest={"name": "image-test"})
        make_tiny_bert(slow, hidden_size=256, layers=4, manifest={"name": "image-test-slow"})
        share_checkpoint(shared)
        share_checkpoint(slow)
    shutil.rmtree(private, ignore_errors=True)
    shutil.copytree(shared, private)
    (private / "model.safetensors").chmod(0o600)
    if os.geteuid() == 0:
        os.chown(private / "model.safetensors", 4242, 4242)  # neither root's nor the image user's
    for folder in (CHECKPOINTS, CHECKPOINTS.parent):
        folder.chmod(0o755)
    return shared, slow, private


def host_scores(checkpoint: Path, items: list[dict]) -> list[float]:
    """What this machine's service, in-process with the same defaults, answers for ``items``."""
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import ServeSettings

    app = create_app(ServeSettings(model=str(checkpoint)))
    with TestClient(app) as client:
        check(app.state.runtime.wait_until_loaded(READY_TIMEOUT_S), "the host's service did not load the model")
        response = client.post("/score", json={"items": items})
        check(response.status_code == 200, f"host /score: {response.status_code} {response.text[:500]}")
        return response.json()["scores"]


# -- running the serving image -------------------------------------------------------------------------------------
class Container:
    def __init__(self, image: str, name: str, *, mount: Path | None = None, env: dict[str, str] | None = None):
        self.name = name
        docker("rm", "-f", name, check_=False)
        argv = ["run", "-d", "--name", name, "-p", "127.0.0.1::8000", "--stop-timeout", str(STOP_TIMEOUT_S),
                "--read-only", "--tmpfs", "/tmp"]  # fmt: skip
        if mount is not None:
            argv += ["-v", f"{mount}:/models/reward:ro"]
        for key, value in (env or {}).items():
            argv += ["-e", f"{key}={value}"]
        docker(*argv, image)
        port = docker("port", name, "8000/tcp").stdout.split()[0].rsplit(":", 1)[1]
        self.url = f"http://127.0.0.1:{port}"

    def state(self) -> dict:
        return json.loads(docker("inspect", "-f", "{{json .State}}", self.name).stdout)

    def logs(self) -> str:
        proc = docker("logs", self.name, check_=False)
        return proc.stdout + proc.stderr

    def wait_ready(self) -> float:
        started = time.monotonic()
        while time.monotonic() - started < READY_TIMEOUT_S:
            check(self.state()["Running"], f"the container exited before becoming ready:\n{self.logs()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.monotonic() - started
            time.sleep(0.5)
        raise Failed(f"/readyz not 200 within {READY_TIMEOUT_S} s:\n{self.logs()[-3000:]}")

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while (state := self.state())["Running"]:
            check(time.monotonic() < deadline, f"the container still runs after {timeout:.0f} s")
            time.sleep(0.5)
        return int(state["ExitCode"])

    def exec(self, *argv: str) -> str:
        return docker("exec", self.name, *argv).stdout.strip()

    def remove(self) -> None:
        docker("rm", "-f", self.name, check_=False)


def score(url: str, items: list[dict]) -> list[float]:
    response = httpx.post(f"{url}/score", json={"items": items}, timeout=60)
    check(response.status_code == 200, f"/score: {response.status_code} {response.text[:500]}")
    return response.json()["scores"]


def check_same_scores(served: list[float], expected: list[float], what: str) -> float:
    worst = max(abs(a - b) for a, b in zip(served, expected, strict=True))
    check(all(math.isfinite(s) for s in served), f"{what}: non-finite scores {served}")
    check(
        worst <= TOLERANCE, f"{what}: container and host differ by {worst:.3g} (> {TOLERANCE}): {served} vs {expected}"
    )
    return worst


def metric(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def check_serving(image: str, checkpoint: Path, expected: list[float]) -> None:
    container = Container(image, "reward-image-test-serve", mount=checkpoint)
    try:
        ready_s = container.wait_ready()
        info = httpx.get(f"{container.url}/info", timeout=10).json()
        check("onnx" in json.dumps(info).lower(), f"/info does not name the ONNX Runtime forward: {info}")
        uid = container.exec("id", "-u")
        check(uid == IMAGE_UID, f"the container runs as uid {uid}, not {IMAGE_UID}")
        scripts = container.exec("sh", "-c", "ls /opt/venv/bin | grep '^reward-'").split()
        check(scripts == ["reward-export", "reward-serve"], f"the serving image's entry points: {scripts}")
        for script in scripts:
            container.exec(script, "--help")
        worst = check_same_scores(score(container.url, TEXTS), expected, "/score")
        metrics = httpx.get(f"{container.url}/metrics", timeout=10).text
        check(metric(metrics, "reward_scored_items_total") >= len(TEXTS), "/metrics: scored items not counted")
        check(metric(metrics, "reward_ready") == 1, "/metrics: reward_ready is not 1")
        log(f"serve: ready in {ready_s:.1f} s, uid {uid}, entry points {scripts}, /score within {worst:.2g} of the "
            f"host, /metrics fine")  # fmt: skip
    finally:
        container.remove()


def check_owner_only_checkpoint(image: str, checkpoint: Path) -> None:
    container = Container(image, "reward-image-test-private", mount=checkpoint)
    try:
        code = container.wait_exit(READY_TIMEOUT_S)
        logs = container.logs()
        check(code == 1, f"exit code {code} for an unreadable checkpoint (expected 1):\n{logs[-2000:]}")
        check("permission denied" in logs and "model.safetensors" in logs, f"no clear reason:\n{logs[-2000:]}")
        line = next(line for line in logs.splitlines() if "permission denied" in line)
        log(f"owner-only weights: exit 1, {line.strip()[-200:]}")
    finally:
        container.remove()


def check_baked(image: str, expected: list[float]) -> None:
    container = Container(image, "reward-image-test-baked")
    try:
        container.wait_ready()
        worst = check_same_scores(score(container.url, TEXTS), expected, "serve-baked /score")
        log(f"serve-baked (owner-only weights baked in): ready, /score within {worst:.2g} of the host")
    finally:
        container.remove()


def check_drain(image: str, checkpoint: Path) -> None:
    """More in-flight work than the drain timeout allows, then ``docker stop``: every request is answered."""
    container = Container(image, "reward-image-test-drain", mount=checkpoint,
                          env={"REWARD_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S)})  # fmt: skip
    requests, items = 48, 64
    # under 4,096 characters a request: tokenized and queued as soon as it is admitted
    body = {"items": [{"text": f"request {i} the quick brown fox jumps over the lazy dog"} for i in range(items)]}
    try:
        container.wait_ready()

        async def load() -> tuple[list, float, float]:
            limits = httpx.Limits(max_connections=requests + 4)
            async with httpx.AsyncClient(base_url=container.url, timeout=120, limits=limits) as client:
                tasks = [asyncio.create_task(client.post("/score", json=body)) for _ in range(requests)]
                deadline = time.monotonic() + 60
                # half of them admitted and waiting (the first may be answered before the last is sent)
                while metric((await client.get("/metrics")).text, "reward_requests_in_flight") < requests // 2:
                    check(time.monotonic() < deadline, "the load never had every request in flight")
                    await asyncio.sleep(0.05)
                started = time.monotonic()
                stop = asyncio.create_task(asyncio.to_thread(docker, "stop", container.name))
                responses = await asyncio.gather(*tasks, return_exceptions=True)
                answered = time.monotonic() - started
                await stop
                return responses, answered, time.monotonic() - started

        responses, answered_s, stopped_s = asyncio.run(load())
        code = container.wait_exit(30)
        errors = [r for r in responses if isinstance(r, BaseException)]
        check(
            not errors, f"{len(errors)} request(s) cut off during the drain: {errors[:3]}\n{container.logs()[-3000:]}"
        )
        statuses = [r.status_code for r in responses]
        check(set(statuses) <= {200, 503}, f"statuses during the drain: {statuses}")
        check(all(r.headers.get("retry-after") for r in responses if r.status_code == 503), "a 503 lacks Retry-After")
        check(code == 0, f"exit code {code} after docker stop:\n{container.logs()[-3000:]}")
        timeline = "\n".join(line for line in container.logs().splitlines() if "uvicorn.access" not in line)
        check(
            stopped_s <= DRAIN_TIMEOUT_S + 2,
            f"docker stop took {stopped_s:.1f} s, drain timeout {DRAIN_TIMEOUT_S} s:\n{timeline[-3000:]}",
        )
        log(f"drain: {requests} requests x {items} items in flight; {statuses.count(200)} scored, "
            f"{statuses.count(503)} refused with 503 + Retry-After, none cut off; all answered {answered_s:.1f} s "
            f"after docker stop, exit 0 after {stopped_s:.1f} s (drain timeout {DRAIN_TIMEOUT_S} s)")  # fmt: skip
    finally:
        container.remove()


def check_training(train_tag: str, serve_tag: str) -> None:
    """docs/deploy.md's "Train in a container", then the serving image on what it wrote."""
    out = CACHE / "trained"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    started = time.perf_counter()
    docker(
        "run", "--rm", "--user", f"{os.getuid()}:{os.getgid()}", "-v", f"{out}:/models", train_tag,
        "--dataset_name", "demo", "--output_dir", "/models/reward", "--num_train_epochs", "1",
    )  # fmt: skip
    log(f"train image: trained on the demo pairs in {time.perf_counter() - started:.0f} s")
    expected = host_scores(out / "reward", TEXTS)
    container = Container(serve_tag, "reward-image-test-trained", mount=out / "reward")
    try:
        container.wait_ready()
        worst = check_same_scores(score(container.url, TEXTS), expected, "trained checkpoint /score")
        log(f"serve image on the train image's checkpoint: ready, /score within {worst:.2g} of the host")
    finally:
        container.remove()


# -- the whole run -------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.image_test", description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", action="store_true", help="also build the train image and serve what it trains")
    parser.add_argument("--keep-daemon", action="store_true", help="leave a dockerd started here running")
    args = parser.parse_args(argv)
    global DOCKER
    DOCKER = docker_client()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    try:
        with docker_daemon(args.keep_daemon), contextlib.ExitStack() as stack:
            build_args: dict[str, str] = {}
            network_host = False
            if registries_reachable():
                log("Docker Hub and the PyTorch index are reachable: building with the Dockerfile's defaults")
            else:
                log("no image registry or PyTorch index: a local base image and a local torch index")
                build_args["PYTHON_IMAGE"] = local_base_image()
                build_args["TORCH_INDEX_URL"] = stack.enter_context(torch_index())
                network_host = True
            check_classic_builder_fails_fast(build_args, network_host)
            shared, slow, private = make_checkpoints()
            build("serve", SERVE_TAG, build_args, network_host, timings)
            baked_args = {**build_args, "MODEL_DIR": str(private.relative_to(ROOT))}
            build("serve-baked", BAKED_TAG, baked_args, network_host, timings)
            if args.train:
                build("train", TRAIN_TAG, build_args, network_host, timings)
            report_contents(SERVE_TAG)
            expected = host_scores(shared, TEXTS)
            check_serving(SERVE_TAG, shared, expected)
            check_owner_only_checkpoint(SERVE_TAG, private)
            check_baked(BAKED_TAG, expected)
            check_drain(SERVE_TAG, slow)
            if args.train:
                check_training(TRAIN_TAG, SERVE_TAG)
            sizes = {tag: image_size(tag) for tag in (SERVE_TAG, TRAIN_TAG) if tag == SERVE_TAG or args.train}
    except (Failed, subprocess.CalledProcessError) as exc:
        log(f"FAILED: {exc}")
        return 1
    summary = ", ".join(f"{target} {seconds:.0f} s" for target, seconds in timings.items())
    log(f"build times: {summary}")
    log("image sizes: " + ", ".join(f"{tag} {size / 1e6:.0f} MB" for tag, size in sizes.items()))
    log(f"passed in {time.perf_counter() - started:.0f} s")
    return 0


DOCKER = "/usr/bin/docker"

if __name__ == "__main__":
    sys.exit(main())
