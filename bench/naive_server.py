"""A naive reward server, the peer the benchmark compares with: built the way OpenRLHF's ``serve_rm`` is.

    python -m bench.naive_server --model DIR [--dtype bfloat16] [--host 127.0.0.1] [--port 0]

One FastAPI app whose ``async def`` route runs the model inside the handler, on that request's own texts: they are
padded to the longest of them in the order they came (no sorting), in one forward pass, and there is no batching
across requests: while one request's forward runs, the event loop is blocked and every other request waits.
That is OpenRLHF's ``RewardModelProxy.get_reward`` behind ``@app.post("/get_reward") async def``, with its
default ``--batch_size`` (the whole request in one forward).

The ids are the project's (the checkpoint's :class:`~training.formatting.Formatter`), so both servers score the
same tokens; only the serving differs. It answers ``POST /score`` (``{"items": [...]}``, the service's shape, so the
load generator sends identical bodies to both) and ``POST /get_reward`` (``{"query": [...]}``, OpenRLHF's), plus
``GET /readyz`` and ``GET /metrics`` with the same batch metrics as the service (items, padded and real tokens per
forward), so the benchmark reads both the same way.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request  # at module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, PlainTextResponse


class _Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.forwards = 0
        self.items = 0
        self.padded = 0
        self.real = 0
        self.seconds = 0.0

    def add(self, batch: Sequence[Sequence[int]], seconds: float) -> None:
        with self.lock:
            self.seconds += seconds
            self.forwards += 1
            self.items += len(batch)
            self.padded += max(len(s) for s in batch) * len(batch)
            self.real += sum(len(s) for s in batch)

    def render(self) -> str:
        with self.lock:
            return (
                f"reward_batch_size_count {self.forwards}\nreward_batch_size_sum {self.items}\n"
                f"reward_batch_tokens_count {self.forwards}\nreward_batch_tokens_sum {self.padded}\n"
                f"reward_batch_real_tokens_count {self.forwards}\nreward_batch_real_tokens_sum {self.real}\n"
                f"reward_forward_seconds_count {self.forwards}\nreward_forward_seconds_sum {self.seconds}\n"
            )


def create_app(checkpoint: Any) -> FastAPI:
    from training.checkpoint import forward_scores

    app = FastAPI(title="naive reward server (OpenRLHF serve_rm pattern)")
    formatter = checkpoint.formatter
    stats = _Stats()

    def get_reward(items: list[dict[str, Any]]) -> list[float]:
        batch = [formatter.encode(item).input_ids for item in items]  # padded to the longest, unsorted
        started = time.perf_counter()
        scores = forward_scores(checkpoint, batch)
        stats.add(batch, time.perf_counter() - started)
        return scores

    @app.post("/score")
    async def score(request: Request) -> JSONResponse:
        data = await request.json()
        scores = get_reward(data["items"])
        return JSONResponse({"scores": scores})

    @app.post("/get_reward")
    async def openrlhf_get_reward(request: Request) -> JSONResponse:
        data = await request.json()
        rewards = get_reward([{"text": q} for q in data["query"]])
        return JSONResponse({"rewards": rewards, "scores": rewards, "extra_logs": {}})

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(stats.render())

    return app


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.naive_server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="reward checkpoint folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed in the log)")
    parser.add_argument("--torch-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    import torch
    import uvicorn

    from training.checkpoint import forward_scores, load_checkpoint

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    checkpoint = load_checkpoint(args.model, dtype=args.dtype, device="cpu")
    ids = checkpoint.formatter.encode({"text": "Warm-up: is this a helpful answer?"}).input_ids
    forward_scores(checkpoint, [ids])
    forward_scores(checkpoint, [ids, ids[: max(1, len(ids) // 2)]])
    uvicorn.run(create_app(checkpoint), host=args.host, port=args.port, log_level="info", log_config=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
