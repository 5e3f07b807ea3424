"""verl reward functions that score with the reward service. Needs only httpx (the ``client`` extra).

verl loads a custom reward function from a file: point ``custom_reward_function.path`` at this module's file
(``python -c "import service.verl; print(service.verl.__file__)"``) and pick the function by what calls it:

- ``compute_score``: one sample per call, blocking (verl's ``naive`` reward manager; also fine from threads);
- ``compute_score_async``: one sample per call, a coroutine (verl's asynchronous reward loop awaits coroutine
  functions and runs plain ones in an executor);
- ``compute_score_batch``: lists in, a list out (``reward_model.reward_manager=batch``).

Each returns the score as a float (a list of floats for the batch form). When the service serves several reward
models combined, each returns verl's dict form instead, ``{"score": combined, "<name>": that model's score, ...}``:
verl takes ``score`` as the reward and logs the other keys (its ``reward_extra_info``). verl passes
``custom_reward_function.reward_kwargs`` as keyword arguments; the ones read here:

- ``reward_service_url``: the service's base URL, or a list of replicas (default: ``$REWARD_SERVICE_URL``);
- ``api_key`` (default: ``$REWARD_SERVICE_API_KEY``), ``normalize`` (default false), ``timeout`` (seconds);
- ``components`` (default true): with several models served, the dict form above; false: the combined float only;
- ``prompt_key``: the ``extra_info`` field holding the prompt (default ``prompt``), a string or a list of chat
  messages. verl hands the reward function only the response (``solution_str``), so a reward model that should
  see the prompt needs the dataset to carry it in ``extra_info``; without it the response is scored alone.

Anything else (``data_source``, ``ground_truth``, other keyword arguments) is ignored.

Concurrent calls coalesce: single-sample calls made while a request is on its way are sent together in the next
one (at most ``max_in_flight`` requests at a time per event loop, 2 by default), so verl's per-sample reward loop
costs a few large requests instead of one request per sample, and a lone sequential call is sent at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from service.client import AsyncRewardClient, BackgroundLoop, chat_messages

logger = logging.getLogger("reward.verl")

URL_ENV = "REWARD_SERVICE_URL"
API_KEY_ENV = "REWARD_SERVICE_API_KEY"
DEFAULT_MAX_IN_FLIGHT = 2

# A float, or with several models served combined verl's dict form: {"score": combined, name: score, ...}.
Reward = float | dict[str, float]


class Settings(NamedTuple):
    """What the reward kwargs configure; hashable, so each distinct configuration gets its own client.

    (A NamedTuple, not a dataclass: verl imports this file under another name without registering it in
    ``sys.modules``, where dataclasses with string annotations fail.)
    """

    urls: tuple[str, ...]
    api_key: str | None
    normalize: bool
    timeout: float
    prompt_key: str
    max_in_flight: int
    components: bool = True

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> Settings:
        url = kwargs.get("reward_service_url") or os.environ.get(URL_ENV)
        if not url:
            raise ValueError(
                f"no reward service URL: set custom_reward_function.reward_kwargs.reward_service_url or ${URL_ENV}"
            )
        urls = (str(url),) if isinstance(url, str) else tuple(str(u) for u in url)
        max_in_flight = int(kwargs.get("max_in_flight", DEFAULT_MAX_IN_FLIGHT))
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        return cls(
            urls=urls,
            api_key=kwargs.get("api_key") or os.environ.get(API_KEY_ENV) or None,
            normalize=bool(kwargs.get("normalize", False)),
            timeout=float(kwargs.get("timeout", 60.0)),
            prompt_key=str(kwargs.get("prompt_key", "prompt")),
            max_in_flight=max_in_flight,
            components=bool(kwargs.get("components", True)),
        )


def make_item(solution_str: str, extra_info: Any, prompt_key: str) -> dict[str, Any]:
    """The service item for one verl sample: prompt + response when ``extra_info`` has the prompt."""
    prompt = extra_info.get(prompt_key) if isinstance(extra_info, Mapping) else None
    if prompt is None:
        return {"text": solution_str}
    if isinstance(prompt, str):
        return {"prompt": prompt, "response": solution_str}
    # A chat prompt (verl keeps it as a list, or a numpy array once it went through parquet).
    return {"messages": [*chat_messages(prompt), {"role": "assistant", "content": solution_str}]}


class Coalescer:
    """Sends items that arrive while requests are in flight together, in one request, when a slot frees.

    Bound to the event loop it is used on. An item whose caller went away (cancelled) is not sent.
    """

    def __init__(
        self, client: AsyncRewardClient, *, normalize: bool = False, max_in_flight: int = 2, components: bool = True
    ):
        self.client = client
        self.normalize = normalize
        self.max_in_flight = max_in_flight
        self.components = components
        self._pending: list[tuple[dict[str, Any], asyncio.Future]] = []
        self._in_flight = 0
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task] = set()

    async def score(self, items: Sequence[dict[str, Any]]) -> list[Reward]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in items]
        self._pending.extend(zip(items, futures, strict=True))
        self._schedule(loop)
        return list(await asyncio.gather(*futures))

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        # call_soon, not an immediate send: the other calls started in this same loop iteration join the request.
        if self._pending and not self._flush_scheduled and self._in_flight < self.max_in_flight:
            self._flush_scheduled = True
            loop.call_soon(self._flush, loop)

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush_scheduled = False
        batch = [(item, future) for item, future in self._pending if not future.done()]
        self._pending = []
        if not batch:
            return
        self._in_flight += 1
        task = loop.create_task(self._send(batch, loop))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[dict[str, Any], asyncio.Future]], loop: asyncio.AbstractEventLoop) -> None:
        try:
            result = await self.client.score([item for item, _ in batch], normalize=self.normalize)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            parts = (getattr(result, "components", None) or {}) if self.components else {}
            for i, (_, future) in enumerate(batch):
                if not future.done():
                    score = result.scores[i]
                    future.set_result({**{n: s[i] for n, s in parts.items()}, "score": score} if parts else score)
        finally:
            self._in_flight -= 1
            self._schedule(loop)


_coalescers: dict[tuple[int, Settings], tuple[asyncio.AbstractEventLoop, Coalescer]] = {}
_warned_no_prompt = False


def _coalescer(settings: Settings) -> Coalescer:
    """The coalescer (and client) for these settings on the running event loop."""
    loop = asyncio.get_running_loop()
    key = (id(loop), settings)
    entry = _coalescers.get(key)
    if entry is None or entry[0] is not loop:
        for stale in [k for k, (other, _) in _coalescers.items() if other.is_closed()]:
            del _coalescers[stale]
        client = AsyncRewardClient(list(settings.urls), api_key=settings.api_key, timeout=settings.timeout)
        coalescer = Coalescer(
            client, normalize=settings.normalize, max_in_flight=settings.max_in_flight, components=settings.components
        )
        entry = (loop, coalescer)
        _coalescers[key] = entry
    return entry[1]


def _items(solution_strs: Sequence[str], extra_infos: Sequence[Any], settings: Settings) -> list[dict[str, Any]]:
    global _warned_no_prompt
    items = [make_item(s, e, settings.prompt_key) for s, e in zip(solution_strs, extra_infos, strict=True)]
    if not _warned_no_prompt and any("text" in item for item in items):
        _warned_no_prompt = True
        logger.warning(
            "extra_info has no %r field: scoring responses without their prompts (set reward_kwargs.prompt_key)",
            settings.prompt_key,
        )
    return items


async def _score(solution_strs: Sequence[str], extra_infos: Sequence[Any], kwargs: Mapping[str, Any]) -> list[Reward]:
    settings = Settings.from_kwargs(kwargs)
    return await _coalescer(settings).score(_items(solution_strs, extra_infos, settings))


async def compute_score_async(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Any = None,
    **reward_kwargs: Any,
) -> Reward:
    """One verl sample's reward, awaited (verl's asynchronous reward loop)."""
    return (await _score([solution_str], [extra_info], reward_kwargs))[0]


def compute_score(
    data_source: Any = None,
    solution_str: str = "",
    ground_truth: Any = None,
    extra_info: Any = None,
    **reward_kwargs: Any,
) -> Reward:
    """One verl sample's reward, blocking. Calls from several threads at once share requests."""
    return BackgroundLoop.shared().run(_score([solution_str], [extra_info], reward_kwargs))[0]


def compute_score_batch(
    data_sources: Sequence[Any] = (),
    solution_strs: Sequence[str] = (),
    ground_truths: Sequence[Any] = (),
    extra_infos: Sequence[Any] | None = None,
    **reward_kwargs: Any,
) -> list[Reward]:
    """A batch's rewards, blocking (``reward_model.reward_manager=batch``)."""
    solution_strs = list(solution_strs)
    infos = [None] * len(solution_strs) if extra_infos is None else list(extra_infos)
    return BackgroundLoop.shared().run(_score(solution_strs, infos, reward_kwargs))
