"""Server subprocesses for the benchmark: the service (``reward-serve``) and the naive peer, on loopback.

Each is started on port 0 (the port is read from its log), waited for until ``/readyz`` answers 200, and stopped
with SIGTERM (SIGKILL after a grace period). The log goes to a file next to the results, not to a pipe, so a
chatty server never blocks on a full pipe and costs nothing to read.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
_PORT = re.compile(r"Uvicorn running on http://[\w.\[\]:]+?:(\d+)")


def _port_arg(argv: Sequence[str]) -> str | None:
    """The port given on the command line, unless it is 0 (then the log says which one was picked)."""
    for flag, value in zip(argv, argv[1:]):
        if flag == "--port" and value != "0":
            return value
    return None


class ServerError(RuntimeError):
    pass


class Server:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        root: Path | None = None,
    ):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.root = Path(root) if root is not None else REPO  # where `python -m` finds the packages
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.root), self.env.get("PYTHONPATH", "")) if p)
        self.proc: subprocess.Popen | None = None
        self.url: str | None = None
        self.external_pid: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else self.external_pid

    @classmethod
    def external(cls, name: str, url: str, pid: int | None = None) -> Server:
        """A server somebody else started (``--service-url``): measured, never started or stopped here."""
        server = cls(name, [], Path("/dev/null"))
        server.url = url.rstrip("/")
        server.external_pid = pid
        return server

    def start(self, timeout: float = 180.0) -> Server:
        return self.launch().wait_ready(timeout)

    def launch(self) -> Server:
        """Start the process without waiting for it (:meth:`wait_ready` waits)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.argv, cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        return self

    def wait_ready(self, timeout: float = 180.0) -> Server:
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise ServerError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                if self.url is None:
                    match = _port_arg(self.argv) or _PORT.search(self.log_path.read_text(errors="replace"))
                    if match:
                        self.url = f"http://127.0.0.1:{match if isinstance(match, str) else match.group(1)}"
                if self.url is not None and self._ready():
                    return self
                time.sleep(0.1)  # polling interval; the deadline bounds the wait
            raise ServerError(f"{self.name} not ready within {timeout:.0f} s:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/readyz", timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def get(self, path: str, timeout: float = 10.0) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read().decode()

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, grace: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def free_port() -> int:
    """A port nobody listens on now (so the server's log level does not matter for finding it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_argv(checkpoint: Path, dtype: str, extra: Sequence[str] = ()) -> list[str]:
    """``reward-serve`` as a module, so the benchmark runs the checkout it lives in."""
    return [
        sys.executable,
        "-m",
        "service.cli",
        "--model",
        str(checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--dtype",
        dtype,
        *extra,
    ]


def naive_argv(checkpoint: Path, dtype: str, extra: Sequence[str] = ()) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bench.naive_server",
        "--model",
        str(checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--dtype",
        dtype,
        *extra,
    ]


# -- /metrics ----------------------------------------------------------------------------------------------------
def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples and label-summed samples of a Prometheus text exposition, by sample name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def batch_stats(
    before: dict[str, float], after: dict[str, float], seconds: float | None = None
) -> dict[str, float | None]:
    """Mean items per forward and padding efficiency (real / padded tokens) between two scrapes; with the seconds
    between them, also the share of that time the inference workers were computing (``forward_busy``) and the
    padded tokens per second of forward (``forward_padded_tokens_per_s``): a slow forward, not an idle worker,
    shows there."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    forwards = delta("reward_batch_size_count")
    items = delta("reward_batch_size_sum")
    padded = delta("reward_batch_tokens_sum")
    real = delta("reward_batch_real_tokens_sum")
    # Forward seconds summed over the inference workers, as if one worker ran them all: forward_busy stays a share
    # of the wall time (0 to 1) and padded tokens per second the whole service's rate while computing.
    forward_s = delta("reward_forward_seconds_sum") / max(1.0, after.get("reward_inference_workers", 1.0))
    timing = "reward_forward_seconds_sum" in after
    return {
        "forward_busy": forward_s / seconds if timing and seconds else None,
        "forward_padded_tokens_per_s": padded / forward_s if timing and forward_s > 0 else None,
        "forwards": forwards,
        "mean_items_per_forward": items / forwards if forwards else None,
        "mean_padded_tokens_per_forward": padded / forwards if forwards else None,
        "padding_efficiency": real / padded if padded and "reward_batch_real_tokens_sum" in after else None,
    }
