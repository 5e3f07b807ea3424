"""``reward-export CHECKPOINT``: write the cached ONNX graph ahead of serving (e.g. in a container build)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from service.backend import CheckpointBackend


def main(argv: Sequence[str] | None = None) -> int:
    """``reward-export CHECKPOINT``: write the cached ONNX graph ahead of serving, and check it."""
    parser = argparse.ArgumentParser(prog="reward-export", description=main.__doc__)
    parser.add_argument("model", help="checkpoint folder (as for reward-serve --model)")
    parser.add_argument("--reward-label", default=None, help="which logit is the reward, as for reward-serve")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        backend = CheckpointBackend.load(args.model, reward_label=args.reward_label, device="cpu", backend="onnx")
    except Exception as exc:
        print(f"reward-export: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    if backend.info.extra.get("backend") != "onnx":
        print(f"reward-export: not exported: {backend.info.extra.get('fallback')}", file=sys.stderr)
        return 1
    print(backend.info.extra["onnx_path"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
