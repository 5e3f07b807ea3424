"""The model side of the service: load a checkpoint, warm it up, score batches of token ids, describe itself.

Loading and the forward pass are ``training.checkpoint``'s (safetensors only, never remote code, right padding);
this module adds what serving needs: a cheap model version, warm-up, out-of-memory as :class:`BatchTooLarge`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from service.batching import BatchTooLarge
from training.formatting import Encoded

logger = logging.getLogger("reward.backend")


@dataclass(frozen=True)
class ModelInfo:
    """What is being served, for /info, the model info metric and every response."""

    name: str
    version: str
    source: str
    dtype: str
    device: str
    has_manifest: bool
    reward_label: str | None
    formatting: dict[str, Any]
    normalization: dict[str, Any] | None
    base_model: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ItemEncoder(Protocol):
    def encode(self, item: Mapping[str, Any]) -> Encoded: ...


class ScoringBackend(Protocol):
    """What the service needs from a model. :class:`CheckpointBackend` is the real one; tests may pass others."""

    info: ModelInfo
    formatter: ItemEncoder

    def forward(self, batch: list[list[int]]) -> list[float]: ...

    def warm_up(self) -> None: ...


Backend = Literal["torch", "onnx", "auto"]


class CheckpointBackend:
    """A reward checkpoint loaded for scoring, its forward run by torch or by ONNX Runtime (``runner``)."""

    def __init__(
        self, checkpoint: Any, info: ModelInfo, runner: Callable[[list[list[int]]], list[float]] | None = None
    ):
        self.checkpoint = checkpoint
        self.formatter = checkpoint.formatter
        self.info = info
        self.runner = runner  # None: transformers in eager mode (training.checkpoint.forward_scores)

    @property
    def pads_batches(self) -> bool:
        """Whether a batch is padded to its longest text (torch) or each text computed alone (ONNX Runtime)."""
        return getattr(self.runner, "pads_batches", True)

    @property
    def shares_prefixes(self) -> bool:
        """Whether items sharing a prompt prefix compute it once when they are in one forward."""
        return getattr(self.runner, "shares_prefixes", False)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        dtype: str = "float32",
        device: str = "auto",
        reward_label: str | None = None,
        max_length: int | None = None,
        truncation_side: str | None = None,
        backend: Backend = "torch",
        prefix_cache_mb: int = 0,
    ) -> CheckpointBackend:
        """Load ``path``. ``backend``: ``torch`` runs transformers in eager mode; ``onnx`` runs the model exported to
        ONNX Runtime (float32 on a CPU), falling back to torch with a warning when it cannot; ``auto`` is ``onnx``
        where that is faster (a float32 encoder on a CPU, with onnxruntime installed) and ``torch`` elsewhere.
        A causal (decoder) model on torch computes shared prompt prefixes once (:mod:`service.shared_forward`),
        keeping up to ``prefix_cache_mb`` MiB of computed prefixes for later requests."""
        from training.checkpoint import load_checkpoint, resolve_device

        checkpoint = load_checkpoint(
            path,
            dtype=dtype,
            device=resolve_device(device),
            reward_label=reward_label,
            max_length=max_length,
            truncation_side=truncation_side,
        )
        if checkpoint.manifest is not None and (max_length is not None or truncation_side is not None):
            logger.warning("--max-length/--truncation-side are ignored: %s has a manifest, served as trained", path)
        model = checkpoint.model
        version = model_version(Path(path), checkpoint.manifest)
        runner, extra = choose_runner(checkpoint, version, backend, prefix_cache_mb)
        recipe = checkpoint.formatter.recipe.to_dict()
        id2label = getattr(model.config, "id2label", {}) or {}
        label_name = id2label.get(checkpoint.label_index, id2label.get(str(checkpoint.label_index)))
        info = ModelInfo(
            name=checkpoint.name,
            version=version,
            source=str(Path(path).resolve()),
            dtype=str(model.dtype).removeprefix("torch."),
            device=str(model.device),
            has_manifest=checkpoint.manifest is not None,
            reward_label=f"{checkpoint.label_index}:{label_name}"
            if label_name is not None
            else str(checkpoint.label_index),
            formatting={k: v for k, v in recipe.items() if k != "chat_template"},
            normalization=checkpoint.normalization,
            base_model=(checkpoint.manifest or {}).get("base_model"),
            extra=extra,
        )
        return cls(checkpoint, info, runner)

    def forward(self, batch: list[list[int]]) -> list[float]:
        from training.checkpoint import forward_scores

        try:
            if self.runner is not None:
                return self.runner(batch)
            return forward_scores(self.checkpoint, batch)
        except RuntimeError as exc:
            if _is_out_of_memory(exc):
                _release_cached_memory()
                raise BatchTooLarge(str(exc)) from exc
            raise

    def warm_up(self) -> None:
        """One forward of one and of two items, so the first request does not pay for lazy initialisation."""
        ids = self.formatter.encode({"text": "Warm-up: is this a helpful answer?"}).input_ids
        self.forward([ids])
        self.forward([ids, ids[: max(1, len(ids) // 2)]])


def choose_runner(checkpoint: Any, version: str, backend: str, prefix_cache_mb: int = 0) -> tuple[Any, dict[str, Any]]:
    """The forward for ``backend`` and what was chosen, for /info. The thread that loads runs as each inference
    worker will (``ThreadPlan.apply``), so a session takes torch's thread count of this thread.

    A causal (decoder) model computes shared prompt prefixes once (:mod:`service.shared_forward`, keeping up to
    ``prefix_cache_mb`` MiB of computed prefixes): through the ONNX decoder graph (:mod:`service.graphs.decoder`)
    for ``onnx``, and for ``auto`` where ONNX Runtime applies (a float32 model on a CPU), else through torch. Any
    other model: the ONNX Runtime forward when asked for and it can be had, else None (transformers' own forward).

    Where ONNX Runtime is tried and the model's architecture has a fast graph (:mod:`service.graphs`) that it does
    not get, ``fast_graph_missing`` says which and why (also in /info and the ``reward_fast_graph_missing`` metric),
    and the log has a warning."""
    if backend not in ("torch", "onnx", "auto"):
        raise ValueError(f"backend must be torch, onnx or auto, not {backend!r}")
    import torch

    from service import graphs, onnx_session, shared_forward

    cache_bytes = prefix_cache_mb * 2**20
    not_shared = shared_forward.unavailable(checkpoint.model)
    onnx_applies = backend == "onnx" or onnx_session.unavailable_reason(checkpoint.model) is None
    if not_shared is None and backend != "torch" and onnx_applies:
        from service import decoder_session

        try:
            runner = decoder_session.load(checkpoint, version, max(1, torch.get_num_threads()), cache_bytes=cache_bytes)
        except onnx_session.OnnxUnavailable as exc:
            logger.warning("ONNX Runtime decoder graph unavailable, scoring with torch instead: %s", exc)
            fallback = shared_forward.PrefixSharingForward(checkpoint, version, cache_bytes=cache_bytes)
            return fallback, {"backend": "torch", "fallback": str(exc), **fallback.describe()}
        extra = {"backend": "onnx", "onnx_path": str(runner.steps.path), "onnx_graph": decoder_session.GRAPH}
        return runner, {**extra, **runner.describe()}
    if backend == "torch" or (backend == "auto" and not_shared is None):
        if not_shared is not None:
            return None, {"backend": "torch", "prefix_sharing": f"off: {not_shared}"}
        runner = shared_forward.PrefixSharingForward(checkpoint, version, cache_bytes=cache_bytes)
        return runner, {"backend": "torch", **runner.describe()}
    if backend == "auto" and onnx_session.unavailable_reason(checkpoint.model) is not None:
        return None, {"backend": "torch"}  # auto: onnx only where it applies and is installed, silently torch otherwise
    try:
        runner = onnx_session.load(checkpoint, version, max(1, torch.get_num_threads()))
    except onnx_session.OnnxUnavailable as exc:
        logger.warning("ONNX Runtime backend unavailable, scoring with torch instead: %s", exc)
        runner, skipped = None, exc.skipped
        extra: dict[str, Any] = {"backend": "torch", "fallback": str(exc)}
    else:
        skipped = runner.skipped
        extra = {"backend": "onnx", "onnx_path": str(runner.path), "onnx_graph": runner.graph}
    fast = graphs.fast_graph_for(checkpoint.model)
    if fast is not None and extra.get("onnx_graph") != fast:
        extra["fast_graph_missing"] = f"{fast}: {skipped.get(fast, 'not tried')}"
    return runner, extra


@dataclass(frozen=True)
class ThreadPlan:
    """How many inference workers run forwards at once, and how many torch threads each one uses."""

    workers: int
    threads_per_worker: int | None  # None: torch's own setting is left alone

    def apply(self) -> None:
        """Set this thread's torch intra-op threads; every thread that runs forwards calls it first."""
        if self.threads_per_worker is not None:
            import torch

            torch.set_num_threads(self.threads_per_worker)


@functools.cache
def torch_default_threads() -> int:
    """torch's intra-op threads as the process started (``OMP_NUM_THREADS``, else the physical cores).

    Read once: after any thread calls ``torch.set_num_threads``, threads started later inherit that value."""
    import torch

    return max(1, torch.get_num_threads())


def plan_threads(
    device: str, workers: int | None = None, threads: int | None = None, available: int | None = None
) -> ThreadPlan:
    """Split the CPU among inference workers unless told otherwise.

    On a CPU the default is two workers sharing torch's threads (``OMP_NUM_THREADS``, else the physical cores):
    two forwards with half the threads each outrun one forward with all of them (no barrier between the halves),
    and a request's HTTP work preempts one worker instead of stalling every thread of one forward at its next
    barrier (docs/benchmarks.md, "Design decisions"). With
    ``threads`` given, as many workers (at most two) as fit in torch's threads. A GPU gets one worker.
    """
    if device.startswith("cuda"):
        return ThreadPlan(workers or 1, threads)
    available = available or torch_default_threads()
    if workers is None:
        per_worker = threads or max(1, available // 2)
        workers = 2 if available >= 2 * per_worker else 1
    if threads is None:
        threads = max(1, available // workers)
    return ThreadPlan(workers, threads)


def _is_out_of_memory(exc: BaseException) -> bool:
    return exc.__class__.__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def _release_cached_memory() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # best effort
        pass


def model_version(path: Path, manifest: Mapping[str, Any] | None) -> str:
    """A short id that changes when the weights or the recipe change; reads at most ~130 KiB per weights file.

    Hashes the manifest (training fingerprint, recipe, normalization), config.json, and for every safetensors file
    its name, size, header (tensor names, shapes, offsets) and the first and last 64 KiB of tensor data.
    """
    digest = hashlib.sha256()
    if manifest is not None:
        digest.update(json.dumps(manifest, sort_keys=True, default=str).encode())
    config = path / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    sample = 64 * 1024
    for weights in sorted(path.glob("*.safetensors")):
        size = weights.stat().st_size
        digest.update(f"{weights.name}:{size}".encode())
        with weights.open("rb") as f:
            raw = f.read(8)
            header_len = struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0
            header_len = min(header_len, 16 * 1024 * 1024)
            digest.update(f.read(header_len))
            digest.update(f.read(sample))
            if size > 8 + header_len + 2 * sample:
                f.seek(-sample, 2)
                digest.update(f.read(sample))
    return digest.hexdigest()[:12]
