"""The forward pass through ONNX Runtime: the checkpoint exported once, cached next to it, checked against torch.

``reward-serve --backend onnx`` (or ``auto`` on a CPU) scores with an ONNX Runtime session instead of transformers
in eager mode. The graph is exported from the loaded model itself (``torch.onnx.export``), so it computes what the
checkpoint computes; :mod:`service.graphs` says which graphs apply to a model, fastest first (a BERT classifier's
last layer computed only where the reward is read, then the model's own forward). Before it is used, a graph's
scores on a few padded batches are compared with torch's; a graph that cannot be exported, or whose exported scores
differ by more than :data:`MAX_SCORE_DIFF`, is logged and the next one tried; when none can be had the model is
served by torch, with one warning in the log saying why.

The exported file is cached as ``<checkpoint>/onnx/<key>.onnx`` (or under ``$REWARD_ONNX_CACHE`` /
``~/.cache/reward-service/onnx`` when the checkpoint folder is read-only), keyed by the model version, the reward
label, the graph and its revision (:data:`GRAPH_REVISION`), the torch version and the opset, so a new checkpoint, a
new way of writing the graph or a new exporter never reuses a stale graph. ``reward-export``
(:mod:`service.export_cli`) writes it ahead of time (e.g. in a container build).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service import graphs

logger = logging.getLogger("reward.backend")

# Largest allowed |onnx - torch| on the check batches: the service's tolerance for scores of the same text.
MAX_SCORE_DIFF = 1e-5
OPSET = 18
# Raised whenever the way a graph is written changes, so that graphs cached by an earlier release are exported anew.
GRAPH_REVISION = 3
CHECK_TEXTS = (
    "Warm-up: is this a helpful answer?",
    "Human: How do I bake bread?\n\nAssistant: Mix flour, water, salt and yeast, let it rise, then bake it.",
    "ok",
)


class OnnxUnavailable(RuntimeError):
    """This model cannot be served through ONNX Runtime here; the message says why, ``skipped`` why each graph
    tried was not used."""

    def __init__(self, message: str, skipped: dict[str, str] | None = None):
        super().__init__(message)
        self.skipped = skipped or {}


def cache_path(checkpoint_dir: Path, key: str) -> Path:
    """Where the exported graph for ``key`` lives: next to the checkpoint when that folder is writable."""
    local = checkpoint_dir / "onnx"
    if (local / f"{key}.onnx").is_file() or _writable(checkpoint_dir if not local.exists() else local):
        return local / f"{key}.onnx"
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    root = Path(os.environ.get("REWARD_ONNX_CACHE") or Path(cache_home) / "reward-service" / "onnx")
    return root / checkpoint_dir.resolve().name / f"{key}.onnx"


def _writable(folder: Path) -> bool:
    return folder.is_dir() and os.access(folder, os.W_OK)


def cache_key(version: str, label_index: int, graph: str = "full") -> str:
    import torch

    torch_version = torch.__version__.split("+")[0]
    return f"{version}-label{label_index}-{graph}-r{GRAPH_REVISION}-torch{torch_version}-opset{OPSET}"


def export(checkpoint: Any, path: Path, graph: str = "full") -> Path:
    """Export ``checkpoint.model`` as ``graph`` (input_ids, attention_mask -> the reward logit) with dynamic batch
    and length."""
    from training.checkpoint import pad_right

    wrapper = graphs.build(checkpoint.model, checkpoint.label_index, graph)
    ids = checkpoint.formatter.encode({"text": CHECK_TEXTS[1]}).input_ids
    input_ids, attention_mask = pad_right([ids, ids[: max(1, len(ids) // 2)]], checkpoint.pad_token_id)
    axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}}
    return write_graph(wrapper, {"input_ids": input_ids, "attention_mask": attention_mask}, ["reward"], axes, path)


def write_graph(
    module: Any, inputs: dict[str, Any], outputs: list[str], dynamic_axes: dict[str, dict[int, str]], path: Path
) -> Path:
    """``module`` traced on ``inputs`` (by name, in its forward's order) and written to ``path`` as ONNX."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed, so that a concurrent or interrupted export never leaves a
    # half-written graph where the next start would load it.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.onnx")
    os.close(fd)
    try:
        with torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                module,
                tuple(inputs.values()),
                tmp,
                input_names=list(inputs),
                output_names=outputs,
                dynamic_axes=dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def cpu_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session over ``path`` running each call on ``threads`` threads, the caller's among them."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise OnnxUnavailable("onnxruntime is not installed (pip install 'reward-service[onnx]')") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 1:
        # Pool threads that spin between forwards take the CPU from the other worker and the event loop.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxForward:
    """``forward(list of token-id lists) -> list of floats`` through one ONNX Runtime session.

    The session is shared by the inference workers (``InferenceSession.run`` may be called from several threads);
    with ``threads`` = 1 each call runs on its caller's thread, which is how the service's CPU workers use it.

    By default each sequence runs on its own, unpadded (``padded=False``): ONNX Runtime's per-call cost is small
    enough that one text at a time scored as fast as length-sorted batches of 8 on the 2-core CPU, and twice as fast
    as batches in arrival order, where padding wastes half the work. Nothing is computed for padding, so the batcher
    need not group texts by length (see ``pads_batches``)."""

    def __init__(self, path: Path, pad_token_id: int, threads: int, *, padded: bool = False, graph: str = "full"):
        self.session = cpu_session(path, threads)
        self.path = path
        self.graph = graph
        self.pad_token_id = pad_token_id
        self.threads = threads
        self.padded = padded
        self.skipped: dict[str, str] = {}  # the faster graphs not used, and why (set by load)

    @property
    def pads_batches(self) -> bool:
        """Whether a batch's texts are padded to its longest (so that grouping them by length saves work)."""
        return self.padded

    def __call__(self, batch: Sequence[Sequence[int]]) -> list[float]:
        import numpy as np

        if not self.padded:
            out = []
            for ids in batch:
                row = np.asarray([ids], dtype=np.int64)
                (reward,) = self.session.run(None, {"input_ids": row, "attention_mask": np.ones_like(row)})
                out.append(float(reward[0]))
            return out

        width = max(len(s) for s in batch)
        input_ids = np.full((len(batch), width), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = ids
            attention_mask[row, : len(ids)] = 1
        (reward,) = self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask})
        return reward.astype(np.float32).tolist()


def check_batches(checkpoint: Any) -> list[list[list[int]]]:
    """Batches whose scores must match torch's: one text, one token, and texts of different lengths padded together."""
    encoded = [checkpoint.formatter.encode({"text": t}).input_ids for t in CHECK_TEXTS]
    # A one-token text too: a traced graph may have fixed a branch that torch takes differently for length 1.
    return [[encoded[0]], [encoded[0][:1]], encoded, [encoded[1], encoded[1][: max(1, len(encoded[1]) // 3)]]]


def unavailable_reason(model: Any) -> str | None:
    """Why ``model`` cannot be served through ONNX Runtime here whatever its architecture, or None."""
    import torch

    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install 'reward-service[onnx]')"
    if str(model.device) != "cpu" or model.dtype != torch.float32:
        return f"exported only from a float32 model on the CPU, not {model.dtype} on {model.device}"
    return None


def load(checkpoint: Any, version: str, threads: int, *, padded: bool = False) -> OnnxForward:
    """The checked ONNX Runtime forward for ``checkpoint``, exporting it first if no cached graph exists.

    The graphs of :func:`service.graphs.graphs_for` are tried in turn; one that cannot be exported or whose scores
    differ from torch's is logged and the next is tried; the forward's ``skipped`` says why each was passed over.
    Raises :class:`OnnxUnavailable` when none can be had (no onnxruntime, export failed, scores differ)."""
    reason = unavailable_reason(checkpoint.model)  # before a costly export
    if reason is not None:
        fast = graphs.fast_graph_for(checkpoint.model)
        raise OnnxUnavailable(reason, {fast: reason} if fast else {})
    names = graphs.graphs_for(checkpoint.model)
    skipped: dict[str, str] = {}
    for name in names:
        try:
            runner = load_graph(checkpoint, version, threads, name, padded=padded)
        except OnnxUnavailable as exc:
            skipped[name] = str(exc)
            if name == names[-1]:
                raise OnnxUnavailable(str(exc), skipped) from exc
            logger.warning("ONNX %s graph not used for %s, trying the next: %s", name, checkpoint.name, exc)
        else:
            runner.skipped = skipped
            return runner
    raise AssertionError("unreachable: graphs_for returns at least one graph")


def load_graph(checkpoint: Any, version: str, threads: int, graph: str, *, padded: bool = False) -> OnnxForward:
    """``graph`` exported (or taken from the cache), loaded and checked against torch's scores."""
    from training.checkpoint import forward_scores

    path = cache_path(Path(checkpoint.path), cache_key(version, checkpoint.label_index, graph))
    if not path.is_file():
        started = time.perf_counter()
        try:
            export(checkpoint, path, graph)
        except OnnxUnavailable:
            raise
        except graphs.GraphMismatch as exc:
            raise OnnxUnavailable(str(exc)) from exc
        except Exception as exc:
            raise OnnxUnavailable(f"export failed: {exc.__class__.__name__}: {exc}") from exc
        logger.info("exported %s to ONNX in %.1f s: %s", checkpoint.name, time.perf_counter() - started, path)
    try:
        runner = OnnxForward(path, checkpoint.pad_token_id, threads, padded=padded, graph=graph)
    except OnnxUnavailable:
        raise
    except Exception as exc:  # e.g. a truncated or foreign file in the cache
        raise OnnxUnavailable(f"ONNX Runtime could not load {path}: {exc.__class__.__name__}: {exc}") from exc
    import numpy as np

    worst = 0.0
    for batch in check_batches(checkpoint):
        expected = np.asarray(forward_scores(checkpoint, batch), dtype=np.float64)
        got = np.asarray(runner(batch), dtype=np.float64)
        worst = max(worst, float(np.max(np.abs(expected - got))))  # NaN propagates through np.max
    if not worst <= MAX_SCORE_DIFF:  # also catches NaN
        raise OnnxUnavailable(f"exported scores differ from torch's by {worst:.3g} (> {MAX_SCORE_DIFF:g})")
    logger.info(
        "ONNX Runtime forward (%s graph) checked against torch (largest difference %.2g): %s", graph, worst, path
    )
    return runner
