"""Python client for the reward service. Needs only httpx (``pip install 'reward-service[client]'``).

    from service.client import RewardClient

    with RewardClient("http://127.0.0.1:8000") as client:
        client.score([{"prompt": "2+2=", "response": "4"}, "plain text works too"]).scores

Several base URLs shard a call's items across replicas. Connection errors, 5xx and 429 are retried on the next
replica: at once while the call has a replica it has not tried yet (a replica that is down, loading, draining or
full says nothing about the others), then with exponential backoff (honouring ``Retry-After``); other 4xx are raised
at once.

:class:`RewardFunction` plugs the service into TRL's ``GRPOTrainer`` / ``RLOOTrainer`` as a ``reward_funcs`` entry.
"""

from __future__ import annotations

import asyncio
import email.utils
import functools
import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

Item = str | Mapping[str, Any]
T = TypeVar("T")
RETRIED_STATUS = frozenset({429, 500, 502, 503, 504})


# -- errors ------------------------------------------------------------------------------------------------------
class RewardServiceError(Exception):
    """The service answered with an error (after retries, for retryable ones)."""

    def __init__(self, status_code: int, detail: Any, url: str):
        super().__init__(f"{url} answered {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.url = url


class RewardRequestError(RewardServiceError):
    """A 4xx other than 429: the request itself is wrong; retrying would not help."""


class RewardServiceUnreachable(Exception):
    """No replica could be reached (after retries)."""


# -- results -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scores:
    scores: list[float]
    truncated: list[bool]
    model: str
    model_version: str
    components: dict[str, list[float]] = field(default_factory=dict)  # several models served combined: each one's


@dataclass(frozen=True)
class Comparison:
    margins: list[float]
    probabilities: list[float]
    chosen_scores: list[float]
    rejected_scores: list[float]
    model: str
    model_version: str


# -- shared logic ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 4
    backoff_s: float = 0.25
    max_backoff_s: float = 10.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), 60.0)
        base = min(self.max_backoff_s, self.backoff_s * (2**attempt))
        return base * (0.5 + random.random() / 2)


def as_item(item: Item) -> dict[str, Any]:
    """A plain string is a ``{"text": ...}`` item; dicts are sent as they are."""
    if isinstance(item, str):
        return {"text": item}
    return dict(item)


def chat_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the service takes them: ``role`` and ``content`` only (a content may be a string or OpenAI-style
    text parts); other keys a trainer keeps (``name``, tool calls, ...) are not sent."""
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        if parsed is None:
            return None
        return max(0.0, parsed.timestamp() - time.time())


def _detail(response: httpx.Response) -> Any:
    try:
        return response.json().get("detail", response.text)
    except ValueError:
        return response.text


def _chunks(seq: Sequence[Any], size: int) -> list[tuple[int, Sequence[Any]]]:
    return [(start, seq[start : start + size]) for start in range(0, len(seq), size)]


class _Base:
    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        api_key: str | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        max_items_per_request: int = 256,
    ):
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls:
            raise ValueError("at least one base URL is needed")
        self.base_urls = [u.rstrip("/") for u in urls]
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_items_per_request = max_items_per_request
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._next = itertools.count()
        self._lock = threading.Lock()

    def _first_replica(self) -> int:
        """Round robin over replicas: where the next request starts (its retries move on to the following ones)."""
        with self._lock:
            return next(self._next)

    def _replica(self, start: int, attempt: int) -> str:
        return self.base_urls[(start + attempt) % len(self.base_urls)]

    def _pause(self, start: int, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after attempt ``attempt`` failed: none when the next attempt goes to a base URL this
        request has not tried (``Retry-After`` is about the replica that sent it), else backoff counted from the
        first repeat. A URL given several times (one Service URL to spread a call) is one replica here."""
        tried = {self._replica(start, k) for k in range(attempt + 1)}
        if self._replica(start, attempt + 1) not in tried:
            return 0.0
        return self.retry.delay(max(0, attempt + 1 - len(tried)), retry_after)

    def _plan(self, items: Sequence[Any]) -> list[tuple[int, Sequence[Any]]]:
        """Split items into requests: at most max_items_per_request each, at least one per replica when possible."""
        if not items:
            return []
        per_replica = -(-len(items) // len(self.base_urls))
        return _chunks(items, max(1, min(self.max_items_per_request, per_replica)))

    def _check(self, response: httpx.Response, url: str) -> dict[str, Any]:
        if response.status_code >= 400:
            cls = (
                RewardRequestError if response.status_code < 500 and response.status_code != 429 else RewardServiceError
            )
            raise cls(response.status_code, _detail(response), url)
        return response.json()


# -- sync ----------------------------------------------------------------------------------------------------------
class RewardClient(_Base):
    """Blocking client. Thread-safe; use as a context manager or call :meth:`close`."""

    def __init__(self, base_url: str | Sequence[str], *, transport: httpx.BaseTransport | None = None, **kwargs: Any):
        super().__init__(base_url, **kwargs)
        self._http = httpx.Client(timeout=self.timeout, headers=self._headers, transport=transport)
        self._pool: ThreadPoolExecutor | None = None

    def score(self, items: Iterable[Item], normalize: bool = False) -> Scores:
        items = [as_item(i) for i in items]
        parts = self._map("/score", self._plan(items), lambda chunk: {"items": list(chunk), "normalize": normalize})
        return _merge_scores(parts)

    def compare(self, pairs: Iterable[Mapping[str, Any]]) -> Comparison:
        pairs = [dict(p) for p in pairs]
        parts = self._map("/compare", self._plan(pairs), lambda chunk: {"pairs": list(chunk)})
        return _merge_comparison(parts)

    def info(self) -> dict[str, Any]:
        return self._post_with_retries("GET", "/info", None)

    def _map(self, route: str, plan, body) -> list[dict[str, Any]]:
        if len(plan) <= 1:
            return [self._post_with_retries("POST", route, body(chunk)) for _, chunk in plan]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=min(16, 2 * len(self.base_urls)))
        futures = [self._pool.submit(self._post_with_retries, "POST", route, body(chunk)) for _, chunk in plan]
        return [f.result() for f in futures]

    def _post_with_retries(self, method: str, route: str, body: dict[str, Any] | None) -> dict[str, Any]:
        attempt, start = 0, self._first_replica()
        while True:
            url = self._replica(start, attempt) + route
            try:
                response = self._http.request(method, url, json=body)
            except httpx.TransportError as exc:
                if attempt >= self.retry.max_retries:
                    raise RewardServiceUnreachable(f"{url}: {exc.__class__.__name__}: {exc}") from exc
                time.sleep(self._pause(start, attempt, None))
            else:
                if response.status_code not in RETRIED_STATUS or attempt >= self.retry.max_retries:
                    return self._check(response, url)
                time.sleep(self._pause(start, attempt, _retry_after(response)))
            attempt += 1

    def close(self) -> None:
        self._http.close()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- async ---------------------------------------------------------------------------------------------------------
class AsyncRewardClient(_Base):
    """asyncio client; one call's requests (shards) run concurrently. Bound to the event loop that first uses it."""

    def __init__(
        self, base_url: str | Sequence[str], *, transport: httpx.AsyncBaseTransport | None = None, **kwargs: Any
    ):
        super().__init__(base_url, **kwargs)
        self._http = httpx.AsyncClient(timeout=self.timeout, headers=self._headers, transport=transport)

    async def score(self, items: Iterable[Item], normalize: bool = False) -> Scores:
        items = [as_item(i) for i in items]
        parts = await self._map(
            "/score", self._plan(items), lambda chunk: {"items": list(chunk), "normalize": normalize}
        )
        return _merge_scores(parts)

    async def compare(self, pairs: Iterable[Mapping[str, Any]]) -> Comparison:
        pairs = [dict(p) for p in pairs]
        parts = await self._map("/compare", self._plan(pairs), lambda chunk: {"pairs": list(chunk)})
        return _merge_comparison(parts)

    async def info(self) -> dict[str, Any]:
        return await self._post_with_retries("GET", "/info", None)

    async def _map(self, route: str, plan, body) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self._post_with_retries("POST", route, body(chunk)) for _, chunk in plan)))

    async def _post_with_retries(self, method: str, route: str, body: dict[str, Any] | None) -> dict[str, Any]:
        attempt, start = 0, self._first_replica()
        while True:
            url = self._replica(start, attempt) + route
            try:
                response = await self._http.request(method, url, json=body)
            except httpx.TransportError as exc:
                if attempt >= self.retry.max_retries:
                    raise RewardServiceUnreachable(f"{url}: {exc.__class__.__name__}: {exc}") from exc
                await asyncio.sleep(self._pause(start, attempt, None))
            else:
                if response.status_code not in RETRIED_STATUS or attempt >= self.retry.max_retries:
                    return self._check(response, url)
                await asyncio.sleep(self._pause(start, attempt, _retry_after(response)))
            attempt += 1

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRewardClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


def _merge_scores(parts: list[dict[str, Any]]) -> Scores:
    if not parts:
        return Scores([], [], "", "")
    return Scores(
        scores=[s for p in parts for s in p["scores"]],
        truncated=[t for p in parts for t in p["truncated"]],
        model=parts[0]["model"],
        model_version=parts[0]["model_version"],
        components={
            name: [x for p in parts for x in p["components"][name]] for name in parts[0].get("components") or {}
        },
    )


def _merge_comparison(parts: list[dict[str, Any]]) -> Comparison:
    if not parts:
        return Comparison([], [], [], [], "", "")
    return Comparison(
        *(
            [x for p in parts for x in p[key]]
            for key in ("margins", "probabilities", "chosen_scores", "rejected_scores")
        ),
        model=parts[0]["model"],
        model_version=parts[0]["model_version"],
    )


# -- calling async code from synchronous callers -------------------------------------------------------------------
class BackgroundLoop:
    """An event loop on a daemon thread, for synchronous callers of the async client (:meth:`run` blocks).

    Its clients and connections live as long as the process; a forked child starts a loop of its own.
    """

    _lock = threading.Lock()
    _shared: BackgroundLoop | None = None

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="reward-client-loop", daemon=True)
        self.thread.start()

    @classmethod
    def shared(cls) -> BackgroundLoop:
        with cls._lock:
            if cls._shared is None or cls._shared.pid != os.getpid():
                cls._shared = cls()
            return cls._shared

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


def _in_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class PendingScores(Sequence[float]):
    """The scores of a call made on a thread whose event loop is running: awaitable, and also a sequence.

    Awaiting it scores on the awaiting loop (what TRL 1.16 does with an async reward function, alongside its other
    async ones). Reading it as a sequence (iterating, ``len``, indexing) blocks until the scores are in, computed on
    a background loop: what TRL 1.0-1.9 does when it calls the function synchronously, as in a notebook, whose thread
    runs an event loop. Nothing is sent until it is awaited or read; the scores are kept once there.
    """

    def __init__(self, score: Callable[[], Coroutine[Any, Any, list[float]]]):
        self._score = score
        self._scores: list[float] | None = None

    def __await__(self) -> Generator[Any, None, list[float]]:
        return self._awaited().__await__()

    async def _awaited(self) -> list[float]:
        if self._scores is None:
            self._scores = await self._score()
        return self._scores

    def _result(self) -> list[float]:
        if self._scores is None:
            self._scores = BackgroundLoop.shared().run(self._score())
        return self._scores

    def __len__(self) -> int:
        return len(self._result())

    def __getitem__(self, index: Any) -> Any:
        return self._result()[index]

    def __iter__(self) -> Iterator[float]:
        return iter(self._result())

    def __repr__(self) -> str:
        return f"PendingScores({self._scores!r})" if self._scores is not None else "PendingScores(<not yet scored>)"


# -- TRL -------------------------------------------------------------------------------------------------------------
class RewardFunction:
    """A TRL ``reward_funcs`` entry (GRPOTrainer, RLOOTrainer) that scores completions with the service.

        trainer = GRPOTrainer(model=..., reward_funcs=[RewardFunction("http://rm:8000")], ...)

    Plain-text prompts and completions are sent as ``{"prompt", "response"}``; conversational ones (lists of
    messages) as ``{"messages": prompt + completion}``. Other keyword arguments (dataset columns, trainer state)
    are ignored, never sent.

    It works with every TRL whose GRPOTrainer takes ``reward_funcs``, whichever way it tells async functions apart,
    in a script or in a notebook:

    - TRL 1.16 asks ``is_async_callable(f)``, which looks at ``f.__call__``: that attribute is :meth:`ascore`, a
      coroutine function, so TRL awaits the call on its event loop, alongside its other async reward functions;
    - TRL 1.0-1.9 ask ``inspect.iscoroutinefunction(f)``, False for an instance, and earlier TRL (0.24) asks
      nothing: they call ``f(...)`` synchronously and iterate the result.

    So ``f(...)`` returns the list of scores when its thread has no running event loop, and a
    :class:`PendingScores` when it has one (a coroutine on an event loop, or a notebook cell): awaiting it or
    reading it both give the scores. ``blocking=True`` makes every call block and return the list, and
    ``__call__`` a plain method, so that TRL of any version sees a plain function.
    """

    def __init__(
        self,
        base_url: str | Sequence[str],
        *,
        normalize: bool = False,
        name: str = "reward_service",
        blocking: bool = False,
        **client_kwargs: Any,
    ):
        self.base_url = base_url
        self.normalize = normalize
        self.blocking = blocking
        self.__name__ = name
        self._client_kwargs = client_kwargs
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, AsyncRewardClient]] = {}
        self._mark_async()

    def _mark_async(self) -> None:
        # Explicit ``f.__call__`` finds this instance attribute; ``f(...)`` uses the class's __call__ below.
        if not self.blocking:
            self.__call__ = self.ascore

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> Any:
        if self.blocking or not _in_running_loop():
            return BackgroundLoop.shared().run(self.ascore(prompts, completions))
        return PendingScores(functools.partial(self.ascore, prompts, completions))

    async def ascore(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
        items = [_trl_item(p, c) for p, c in zip(prompts, completions, strict=True)]
        result = await self._client().score(items, normalize=self.normalize)
        return result.scores

    def _client(self) -> AsyncRewardClient:
        """One client per event loop (httpx connections belong to the loop that opened them)."""
        loop = asyncio.get_running_loop()
        entry = self._clients.get(id(loop))
        if entry is None or entry[0] is not loop:
            self._clients = {k: v for k, v in self._clients.items() if not v[0].is_closed()}
            entry = (loop, AsyncRewardClient(self.base_url, **self._client_kwargs))
            self._clients[id(loop)] = entry
        return entry[1]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_clients"] = {}
        state.pop("__call__", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._mark_async()

    def __repr__(self) -> str:
        return f"RewardFunction({self.base_url!r}, normalize={self.normalize})"


def _trl_item(prompt: Any, completion: Any) -> dict[str, Any]:
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "response": completion}
    if isinstance(prompt, list) and isinstance(completion, list):
        return {"messages": chat_messages([*prompt, *completion])}
    raise TypeError(
        f"prompts and completions must both be strings or both be message lists, got "
        f"{type(prompt).__name__} and {type(completion).__name__}"
    )
