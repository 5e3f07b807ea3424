"""Where the CPU went during a measurement: this process, the server process (and its event-loop thread), and
everyone else on the machine (other developers, training runs), from ``/proc``.

On a shared 2-core machine this is what tells a real gap from a contaminated measurement: a scenario during which
others used a core is not comparable to one during which they did not. Without ``/proc`` (macOS) the probe reports
wall time and this process's CPU only.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs together."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is counted in user)
    return total - idle, total


def _task_ticks(pid: int, tid: int | None = None) -> int | None:
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        raw = Path(path).read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of stat)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


class CpuProbe:
    """Start on construction, :meth:`stop` returns CPU use in cores (1.0 = one core busy the whole time)."""

    def __init__(self, server_pids: Sequence[int] = ()):
        self.server_pids = list(server_pids)
        self._wall = time.perf_counter()
        self._own = time.process_time()
        self._machine = _machine_ticks()
        self._servers = [_task_ticks(p) for p in self.server_pids]
        self._mains = [_task_ticks(p, p) for p in self.server_pids]

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._wall
        own = (time.process_time() - self._own) / wall
        out: dict[str, Any] = {"wall_s": round(wall, 3), "bench_process_cores": round(own, 3)}
        server_cores = 0.0
        if self.server_pids:
            servers = [_task_ticks(p) for p in self.server_pids]
            mains = [_task_ticks(p, p) for p in self.server_pids]
            if all(v is not None for v in servers + self._servers):
                server_cores = sum(b - a for a, b in zip(self._servers, servers)) / _TICK / wall  # type: ignore[operator]
                out["server_cores"] = round(server_cores, 3)
            if all(v is not None for v in mains + self._mains):
                main = sum(b - a for a, b in zip(self._mains, mains)) / _TICK / wall  # type: ignore[operator]
                out["server_main_thread_cores"] = round(main, 3)  # the event loop (uvicorn runs it on the main thread)
        machine = _machine_ticks()
        if machine is not None and self._machine is not None and machine[1] > self._machine[1]:
            busy = (machine[0] - self._machine[0]) / (machine[1] - self._machine[1]) * cpu_count()
            out["machine_busy_cores"] = round(busy, 3)
            out["others_cores"] = round(max(0.0, busy - own - server_cores), 3)
        return out


def sample_machine(seconds: float = 1.0) -> dict[str, Any]:
    """How busy the machine is right now (before the benchmark starts anything)."""
    probe = CpuProbe()
    time.sleep(seconds)
    out = probe.stop()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
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
        if busy is None:  # no /proc: nothing to wait for
            return {"waited_s": 0.0, "quiet": None}
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
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
        info["cpu_flags"] = [
            f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni") if f" {f}" in flags
        ]
        mem = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal"))
        info["memory_gib"] = round(int(mem.split()[1]) / 1024 / 1024, 1)
    except (OSError, StopIteration):
        pass
    try:
        from importlib.metadata import version

        for package in ("torch", "transformers", "tokenizers", "fastapi", "uvicorn", "httpx"):
            info[package] = version(package)
        import torch

        info["torch_threads"] = torch.get_num_threads()
    except Exception:
        pass
    return info
