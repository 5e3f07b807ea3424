"""The load generator: closed-loop clients (each sends, waits for the answer, sends again) and an open-loop run at a
fixed arrival rate, both over keep-alive HTTP/1.1 connections on loopback.

The client is a minimal HTTP/1.1 keep-alive client on asyncio streams (uvloop when installed), one connection per
simulated worker. It costs far less CPU per request than httpx, which matters when the load generator shares a
small machine with the server it measures: every millisecond it spends is taken from the server.
``bench_process_cores`` in the report says how much it took.

Every request body is built before the clock starts. A request counts when its answer arrives inside the
measurement window (after the warm-up), so throughput is completed texts per second of window.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Payload:
    body: bytes
    texts: int
    tokens: int


@dataclass
class Record:
    start: float  # when the request was sent (closed loop) or scheduled (open loop)
    done: float
    texts: int
    tokens: int
    ok: bool


@dataclass
class LoadResult:
    records: list[Record]
    window: tuple[float, float]
    errors: dict[str, int] = field(default_factory=dict)
    dropped: int = 0  # open loop: arrivals not sent because max_in_flight requests were outstanding
    open_loop: bool = False
    snapshots: list[tuple[float, Any]] = field(default_factory=list)  # scrape() at the window's start and end

    def summary(self) -> dict[str, Any]:
        lo, hi = self.window
        if self.open_loop:  # the requests scheduled inside the window, however long they took
            counted = [r for r in self.records if lo <= r.start < hi]
            done = max((r.done for r in counted), default=hi)
            seconds = max(hi, done) - lo
        else:  # the requests answered inside the window
            counted = [r for r in self.records if lo <= r.done <= hi]
            seconds = hi - lo
        ok = [r for r in counted if r.ok]
        texts_per_s = sum(r.texts for r in ok) / seconds if seconds > 0 else 0.0
        tokens_per_s = sum(r.tokens for r in ok) / seconds if seconds > 0 else 0.0
        if not self.open_loop and len(ok) >= 3:
            # From the first to the last answer in the window rather than edge to edge: with few large requests
            # (4 clients x 64 texts) the window edges would cut the count to whole requests.
            first, last = min(r.done for r in ok), max(r.done for r in ok)
            if last > first:
                rest = [r for r in ok if r.done > first]
                texts_per_s = sum(r.texts for r in rest) / (last - first)
                tokens_per_s = sum(r.tokens for r in rest) / (last - first)
        latencies = sorted(r.done - r.start for r in ok)
        texts = sum(r.texts for r in ok)
        return {
            "window_s": round(seconds, 3),
            "requests": len(ok),
            "failed_requests": len(counted) - len(ok),
            "errors": dict(self.errors),
            "dropped_arrivals": self.dropped,
            "texts": texts,
            "texts_per_s": texts_per_s,
            "tokens_per_s": tokens_per_s,
            "latency_ms": {
                "p50": _pct(latencies, 50),
                "p95": _pct(latencies, 95),
                "p99": _pct(latencies, 99),
                "mean": 1000 * sum(latencies) / len(latencies) if latencies else None,
                "max": 1000 * latencies[-1] if latencies else None,
            },
            "latencies_ms": [round(1000 * x, 2) for x in latencies],
        }


def _pct(ordered: Sequence[float], p: float) -> float | None:
    if not ordered:
        return None
    rank = max(0, min(len(ordered) - 1, int(round(p / 100 * len(ordered) + 0.5)) - 1))  # nearest rank
    return round(1000 * ordered[rank], 2)


def build_payloads(
    items: Sequence[dict[str, Any]],
    lengths: Sequence[int],
    per_request: int,
    *,
    api: str = "service",
    max_length: int | None = None,
) -> list[Payload]:
    """Request bodies of ``per_request`` consecutive items each, wrapping around the pool, covering it once.

    ``api``: ``service`` (this service's and the naive server's ``/score``) or ``vllm`` (vLLM's ``/classify``: the
    same texts, the raw logit (``use_activation: false``), truncated to ``max_length`` tokens like the service)."""
    n = len(items)
    count = max(1, -(-n // per_request))
    out = []
    for j in range(count):
        idx = [(j * per_request + k) % n for k in range(per_request)]
        if api == "vllm":
            request: dict[str, Any] = {
                "model": "rm",
                "input": [item_text(items[i]) for i in idx],
                "use_activation": False,
            }
            if max_length is not None:
                request["truncate_prompt_tokens"] = max_length
        else:
            request = {"items": [items[i] for i in idx], "normalize": False}
        out.append(Payload(json.dumps(request).encode(), per_request, sum(lengths[i] for i in idx)))
    return out


def item_text(item: dict[str, Any]) -> str:
    """The text the service scores for a ``text`` or ``prompt`` + ``response`` item (the formatter's concatenation)."""
    if item.get("text") is not None:
        return item["text"]
    if item.get("prompt") is not None and item.get("response") is not None:
        return item["prompt"] + item["response"]
    raise ValueError("only text and prompt + response items can be sent to a text-only API")


# -- clients -----------------------------------------------------------------------------------------------------
class ClientError(Exception):
    pass


class StaleConnection(ClientError):
    """A reused connection that the server had closed: nothing was answered, the request can be resent."""


class RawConnection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON and reads a Content-Length (or chunked) answer."""

    def __init__(self, host: str, port: int, path: str):
        self.host, self.port, self.path = host, port, path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._head = (
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: "
        )

    async def post(self, body: bytes) -> tuple[int, bytes]:
        reused = self.writer is not None
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.write(self._head.encode() + str(len(body)).encode() + b"\r\n\r\n" + body)
            try:
                head = await self.reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
                if reused and (not isinstance(exc, asyncio.IncompleteReadError) or not exc.partial):
                    await self.close()
                    raise StaleConnection(f"{exc.__class__.__name__}: {exc}") from exc
                raise
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                if ":" in line:
                    k, v = line.split(":", 1)
                    headers[k.strip().lower()] = v.strip()
            if "content-length" in headers:
                data = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                data = await self._read_chunked()
            else:
                raise ClientError("answer without Content-Length or chunked encoding")
            if headers.get("connection", "").lower() == "close":
                await self.close()
            return status, data
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
            await self.close()
            raise ClientError(f"{exc.__class__.__name__}: {exc}") from exc

    async def _read_chunked(self) -> bytes:
        assert self.reader is not None
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


class RawPool:
    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
        self.idle: list[RawConnection] = []

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self.idle:
            conn = self.idle.pop()
            try:
                status, data = await conn.post(body)
            except StaleConnection:  # the server closed it while idle (keep-alive timeout): once more, on a new one
                conn = RawConnection(self.host, self.port, self.path)
                status, data = await conn.post(body)
        else:
            conn = RawConnection(self.host, self.port, self.path)
            status, data = await conn.post(body)
        self.idle.append(conn)
        return status, data

    async def aclose(self) -> None:
        for conn in self.idle:
            await conn.close()
        self.idle.clear()


async def _send(
    pool, payload: Payload, start: float, records: list[Record], errors: dict[str, int], timeout: float
) -> Record:
    ok = False
    try:
        status, data = await asyncio.wait_for(pool.post(payload.body), timeout)
        if status == 200:
            answer = json.loads(data)
            scores = answer["scores"] if "scores" in answer else answer["data"]  # the service's, or vLLM's
            ok = len(scores) == payload.texts
            if not ok:
                errors["wrong_count"] = errors.get("wrong_count", 0) + 1
        else:
            errors[str(status)] = errors.get(str(status), 0) + 1
    except (ClientError, asyncio.TimeoutError, KeyError, ValueError) as exc:
        key = f"{exc.__class__.__name__}: {str(exc)[:80]}" if isinstance(exc, ClientError) else exc.__class__.__name__
        errors[key] = errors.get(key, 0) + 1
    record = Record(start, time.perf_counter(), payload.texts, payload.tokens, ok)
    records.append(record)
    return record


# -- scenarios ---------------------------------------------------------------------------------------------------
async def _snapshot_at(times: Sequence[float], scrape: Callable[[], Any] | None, out: list[tuple[float, Any]]) -> None:
    """Call ``scrape`` (blocking, so in a worker thread) at each of ``times`` (perf_counter clock)."""
    if scrape is None:
        return
    loop = asyncio.get_running_loop()
    for t in times:
        delay = t - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            data = await loop.run_in_executor(None, scrape)
        except Exception:  # a failed scrape only loses the per-window batch statistics
            return
        out.append((time.perf_counter(), data))


async def closed_loop(
    url: str,
    payloads: Sequence[Payload],
    *,
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    timeout: float = 120.0,
    min_requests: int = 1,
    scrape: Callable[[], Any] | None = None,
) -> LoadResult:
    """``concurrency`` workers, each sending the next payload as soon as its previous answer arrived.

    The window lasts ``duration_s`` after the warm-up, or longer (up to ``timeout``) until ``min_requests``
    answers arrived in it: a short smoke run on a busy machine still measures something.
    """
    records: list[Record] = []
    errors: dict[str, int] = {}
    pool = RawPool(url)
    start = time.perf_counter()
    window = [start + warmup_s, start + warmup_s + duration_s]
    hard_stop = window[1] + timeout
    in_window = 0

    def more() -> bool:
        now = time.perf_counter()
        return now < window[1] or (in_window < min_requests and now < hard_stop)

    async def worker(k: int) -> None:
        nonlocal in_window
        i = k
        while more():
            payload = payloads[i % len(payloads)]
            i += concurrency
            done = (await _send(pool, payload, time.perf_counter(), records, errors, timeout)).done
            if done >= window[0]:
                in_window += 1
                if done > window[1] and in_window <= min_requests:
                    window[1] = done  # stretched until min_requests answers are in

    snapshots: list[tuple[float, Any]] = []
    snapper = asyncio.ensure_future(_snapshot_at(list(window), scrape, snapshots))
    try:
        await asyncio.wait_for(
            asyncio.gather(*(worker(k) for k in range(concurrency))), warmup_s + duration_s + 2 * timeout + 5
        )
        await asyncio.wait_for(snapper, timeout)
    finally:
        snapper.cancel()
        await pool.aclose()
    return LoadResult(records, (window[0], window[1]), errors, snapshots=snapshots)


async def open_loop(
    url: str,
    payloads: Sequence[Payload],
    *,
    rate: float,
    warmup_s: float,
    duration_s: float,
    max_in_flight: int = 512,
    timeout: float = 120.0,
    scrape: Callable[[], Any] | None = None,
) -> LoadResult:
    """Requests at fixed intervals of ``1/rate`` seconds, whatever the answers do; latency counts from the
    scheduled send time (no coordinated omission)."""
    records: list[Record] = []
    errors: dict[str, int] = {}
    pool = RawPool(url)
    start = time.perf_counter()
    window = (start + warmup_s, start + warmup_s + duration_s)
    total = int(rate * (warmup_s + duration_s))
    tasks: set[asyncio.Task] = set()
    dropped = 0
    snapshots: list[tuple[float, Any]] = []
    snapper = asyncio.ensure_future(_snapshot_at(list(window), scrape, snapshots))
    try:
        for i in range(total):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(tasks) >= max_in_flight:
                dropped += 1
                continue
            task = asyncio.ensure_future(_send(pool, payloads[i % len(payloads)], scheduled, records, errors, timeout))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks), timeout=timeout + 5)
        await asyncio.wait_for(snapper, timeout)
    finally:
        snapper.cancel()
        for task in list(tasks):
            task.cancel()
        await pool.aclose()
    return LoadResult(records, window, errors, dropped, open_loop=True, snapshots=snapshots)


def run(coro_factory: Callable[[], Any]) -> Any:
    """Run a load coroutine on uvloop when it is installed (a cheaper event loop for the client side)."""
    try:
        import uvloop
    except ImportError:
        uvloop = None
    if uvloop is not None and hasattr(asyncio, "Runner"):  # Python 3.11+
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro_factory())
    return asyncio.run(coro_factory())
