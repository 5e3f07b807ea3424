"""Where the CPU went during a measurement: this process, the server process (and its event-loop thread), and
everyone else on the machine (other developers, training runs), from psutil.

On a shared machine with few cores this is what tells a real gap from a contaminated measurement: a scenario
during which others used a core is not comparable to one during which they did not.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil


def _machine_times() -> tuple[float, float]:
    """(busy, total) CPU seconds of all CPUs together since boot."""
    times = psutil.cpu_times()
    total = sum(times)
    idle = times.idle + getattr(times, "iowait", 0.0)
    # guest time is already counted in user time on Linux
    total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    return total - idle, total


def _process_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads); None once it is gone."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return None
    return times.user + times.system


def _main_thread_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process's main thread (its thread id is the pid)."""
    try:
        threads = psutil.Process(pid).threads()
    except psutil.Error:
        return None
    return next((t.user_time + t.system_time for t in threads if t.id == pid), None)


def cpu_count() -> int:
    try:
        return len(psutil.Process().cpu_affinity())
    except (AttributeError, psutil.Error):  # no affinity on macOS
        return psutil.cpu_count() or 1


class CpuProbe:
    """Start on construction, :meth:`stop` returns CPU use in cores (1.0 = one core busy the whole time)."""

    def __init__(self, server_pids: Sequence[int] = ()):
        self.server_pids = list(server_pids)
        self._wall = time.perf_counter()
        self._own = time.process_time()
        self._machine = _machine_times()
        self._servers = [_process_seconds(p) for p in self.server_pids]
        self._mains = [_main_thread_seconds(p) for p in self.server_pids[:1]]  # the server's own event loop

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._wall
        own = (time.process_time() - self._own) / wall
        out: dict[str, Any] = {"wall_s": round(wall, 3), "bench_process_cores": round(own, 3)}
        server_cores = 0.0
        if self.server_pids:
            servers = [_process_seconds(p) for p in self.server_pids]
            mains = [_main_thread_seconds(p) for p in self.server_pids[:1]]
            if all(v is not None for v in servers + self._servers):
                server_cores = sum(b - a for a, b in zip(self._servers, servers, strict=True)) / wall  # type: ignore[operator]
                out["server_cores"] = round(server_cores, 3)
            if all(v is not None for v in mains + self._mains):
                main = sum(b - a for a, b in zip(self._mains, mains, strict=True)) / wall  # type: ignore[operator]
                out["server_main_thread_cores"] = round(main, 3)  # the event loop (uvicorn runs it on the main thread)
        machine = _machine_times()
        if machine[1] > self._machine[1]:
            busy = (machine[0] - self._machine[0]) / (machine[1] - self._machine[1]) * psutil.cpu_count()
            out["machine_busy_cores"] = round(busy, 3)
            out["others_cores"] = round(max(0.0, busy - own - server_cores), 3)
        return out


def sample_machine(seconds: float = 1.0) -> dict[str, Any]:
    """How busy the machine is right now (before the benchmark starts anything)."""
    probe = CpuProbe()
    time.sleep(seconds)
    out = probe.stop()
    load = psutil.getloadavg()
    return {"busy_cores": out.get("machine_busy_cores"), "loadavg_1_5_15": [round(x, 2) for x in load]}


def wait_quiet(
    max_wait_s: float, *, threshold_cores: float = 0.3, quiet_s: float = 10.0, own_pids: Sequence[int] = (), log=print
) -> dict[str, Any]:
    """Wait (up to ``max_wait_s``) until the rest of the machine has used under ``threshold_cores`` for ``quiet_s``
    in a row. Returns how long it waited and whether it got quiet; on a shared machine, run it before measuring."""
    started = time.perf_counter()
    quiet_since: float | None = None
    announced = False
    while True:
        probe = CpuProbe(own_pids)
        time.sleep(1.0)
        busy = probe.stop().get("others_cores")
        now = time.perf_counter()
        if busy < threshold_cores:
            quiet_since = quiet_since if quiet_since is not None else now - 1.0
            if now - quiet_since >= quiet_s:
                return {"waited_s": round(now - started, 1), "quiet": True}
        else:
            quiet_since = None
            if not announced:
                log(f"  waiting for the machine to be quiet (others use {busy:.2f} cores; at most {max_wait_s:.0f} s)")
                announced = True
        if now - started >= max_wait_s:
            log(f"  the machine did not get quiet within {max_wait_s:.0f} s: measuring anyway (see others' cores)")
            return {"waited_s": round(now - started, 1), "quiet": False}


def describe_machine() -> dict[str, Any]:
    """The machine a result came from: CPU model and instruction sets (:func:`service.hardware.describe_cpu`),
    memory, library versions. Every report carries it: a figure without its CPU cannot be compared."""
    from service.hardware import describe_cpu

    cpu = describe_cpu()
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": cpu_count(),
        "cpu_model": cpu["model"],
        "isa": cpu["isa"],
        "cpu": cpu,
    }
    info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    try:  # the CPU's name and ISA extensions: Linux only
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        cpuinfo = []
    for line in cpuinfo:
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni")
            info.setdefault("cpu_flags", [f for f in wanted if f in flags])
    try:
        from importlib.metadata import version

        for package in ("torch", "transformers", "tokenizers", "fastapi", "uvicorn", "httpx"):
            info[package] = version(package)
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except Exception:
        pass
    return info
