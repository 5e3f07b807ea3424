"""``python -m bench.grpo``: a decoder reward model under GRPO-shaped load, the service against vLLM's pooling runner
with and without its prefix cache, interleaved in one run.

    python -m bench.grpo [--data Anthropic/hh-rlhf | FILE.jsonl] [--shape smollm2-135m] [--duration-s 30] [--repeats 2]
                         [--groups 960 --fresh-prompts]

The model and texts are :mod:`bench.decoder`'s: a random-weight sequence classifier of a real shape (speed does not
depend on weight values) with a byte-level BPE tokenizer of 16k trained in-process on the data, and GRPO-shaped
groups (a prompt with 8 completions: its own chosen and rejected reply and 6 replies of other pairs), so the same
prompt tokens are scored 8 times. Three load patterns, each against every server in turn (service, vLLM with its
prefix cache, vLLM without), ``--repeats`` times:

- ``group``: 16 closed-loop clients, one group of 8 completions per request (TRL GRPO, OpenRLHF <= 0.9.0 per prompt);
- ``text``: 64 clients, one text per request, a group's completions sent together (OpenRLHF >= 0.9.1, slime);
- ``4x64``: 4 clients, 8 groups per request (a rollout step in few large requests).

Both servers score the same token ids: the service appends the tokenizer's eos (its decoder recipe), and vLLM is
sent each text with the eos token written out, which its tokenizer reads as that one token.

Every window sends the same texts from the first group on, so after the first window both servers may find prompts
in their caches; ``--fresh-prompts`` (with enough ``--groups``) starts each window further on, so that every prompt
is new to the server, as in a GRPO step. The report gives texts/s, p50/p99 latency, failed requests by status, the
ratios to vLLM, and each server's tokens computed per token scored (from its ``/metrics``: the service's own
counters; vLLM's prompt tokens less its prefix-cache hits).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import load as loadgen
from bench.decoder import MAX_LENGTH, SHAPES, grpo_groups, make_decoder
from bench.procstat import describe_machine
from bench.report import cpu_line
from bench.servers import PEERS_PYTHON, Server, parse_metrics, service_argv, vllm_argv, vllm_env
from bench.texts import add_data_arguments, load_rows

REPO = Path(__file__).resolve().parents[1]
GROUP = 8

PATTERNS = {"group": (16, 1), "text": (64, 0), "4x64": (4, 8)}  # clients, groups per request (0: one text)


# -- load --------------------------------------------------------------------------------------------------------
def payloads(groups: list[list[str]], pattern: str, api: str, eos: str, max_length: int) -> list[loadgen.Payload]:
    """Request bodies in group order, so that a group's texts are sent together."""
    per = PATTERNS[pattern][1]
    texts = [t for g in groups for t in g]
    chunks = (
        [[t] for t in texts] if per == 0 else [texts[i : i + per * GROUP] for i in range(0, len(texts), per * GROUP)]
    )
    out = []
    for chunk in chunks:
        if api == "vllm":
            body = {"model": "rm", "input": [t + eos for t in chunk], "use_activation": False}
            body["truncate_prompt_tokens"] = max_length
        else:
            body = {"items": [{"text": t} for t in chunk], "normalize": False}
        out.append(loadgen.Payload(json.dumps(body).encode(), len(chunk), 0))
    return out


def rotated(groups: list[list[str]], window: int, windows: int) -> list[list[str]]:
    """The groups in the order window ``window`` of ``windows`` sends them: starting ``window`` strides of
    ``len(groups) // windows`` in, so that a window meets prompts no earlier one sent (as long as it does not get
    through a whole stride)."""
    start = window * (len(groups) // windows)
    return groups[start:] + groups[:start]


def run_one(server: Server, route: str, bodies, clients: int, warmup_s: float, duration_s: float, timeout: float):
    scrape = lambda: parse_metrics(_get(server.url + "/metrics"))  # noqa: E731
    before = scrape()
    result = loadgen.run(
        lambda: loadgen.closed_loop(
            server.url + route, bodies, concurrency=clients, warmup_s=warmup_s, duration_s=duration_s, timeout=timeout
        )
    )
    summary = result.summary()
    summary.pop("latencies_ms", None)
    after = scrape()
    # Counters (``_total``) as what this run added; gauges (cache bytes, entries, capacity) as they stand after it.
    # vLLM's own: prompt tokens, and prompt tokens looked up in / found in its prefix cache.
    summary["counters"] = {
        k: after[k] - before.get(k, 0.0) if k.endswith("_total") else after[k]
        for k in after
        if (k.startswith("reward_tokens_") or "prefix" in k or k == "vllm:prompt_tokens_total")
        and not k.endswith("_created")
    }
    return summary


def computed_share(counters: dict[str, float]) -> float | None:
    """Tokens computed per token scored: the service's own counters, or for vLLM its prompt tokens less those its
    prefix cache held."""
    scored, computed = counters.get("reward_tokens_scored_total"), counters.get("reward_tokens_computed_total")
    if scored and computed is not None:
        return computed / scored
    prompt, hits = counters.get("vllm:prompt_tokens_total"), counters.get("vllm:prefix_cache_hits_total")
    if prompt:
        return (prompt - (hits or 0.0)) / prompt
    return None


def _get(url: str) -> str:
    import httpx

    return httpx.get(url, timeout=30).text


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.grpo", description=__doc__.split("\n\n")[0])
    add_data_arguments(p)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--checkpoint", type=Path, help="where the random model is written (default: checkpoints/)")
    p.add_argument("--groups", type=int, default=64, help="prompts, 8 texts each")
    p.add_argument("--patterns", default="group,text,4x64")
    p.add_argument(
        "--fresh-prompts",
        action="store_true",
        help="start each load window a stride further into the groups (use many --groups), so that no window "
        "re-sends prompts an earlier one left in a server's cache",
    )
    p.add_argument("--servers", default="service,vllm-prefix,vllm-noprefix")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="both servers' dtype (bfloat16 pays only on a CPU with bfloat16 instructions)",
    )
    p.add_argument("--service-args", default="", help="extra reward-serve flags, space-separated")
    p.add_argument("--peer-python", type=Path, default=PEERS_PYTHON)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--duration-s", type=float, default=30.0)
    p.add_argument("--timeout-s", type=float, default=120.0, help="client-side timeout per request")
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results" / "grpo")
    args = p.parse_args(argv)

    rows, source = load_rows(args.data, data_dir=args.data_dir, split=args.split)
    groups = [[item["text"] for item in group] for group in grpo_groups(rows, groups=args.groups, per_group=GROUP)]
    if not groups:
        p.error(f"no usable preference rows in {args.data}")
    checkpoint = args.checkpoint or REPO / "checkpoints" / f"bench-{args.shape}-random"
    texts = [t for g in groups for t in g]
    if not (checkpoint / "reward_manifest.json").is_file():
        make_decoder(checkpoint, args.shape, rows)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(checkpoint)
    eos = tok.eos_token
    prompt_tokens = [len(tok(os.path.commonprefix(g))["input_ids"]) for g in groups]
    text_tokens = [len(tok(t)["input_ids"]) + 1 for t in texts]

    names = args.servers.split(",")
    servers: dict[str, Server] = {}
    try:
        for name in names:  # started together, then waited for: vLLM takes minutes to start on a small CPU
            if name == "service":
                servers[name] = Server(name, service_argv(checkpoint, args.dtype, args.service_args.split()))
            else:
                cache = "--enable-prefix-caching" if name == "vllm-prefix" else "--no-enable-prefix-caching"
                argv_ = vllm_argv(checkpoint, args.dtype, MAX_LENGTH + 8, python=args.peer_python, extra=[cache])
                servers[name] = Server(name, argv_, env=vllm_env(), ready_path="/health")
            servers[name].launch()
        for server in servers.values():
            server.wait_ready(900)
        runs: list[dict[str, Any]] = []
        patterns = args.patterns.split(",")
        for repeat in range(args.repeats):
            for index, pattern in enumerate(patterns):
                window = repeat * len(patterns) + index
                window_groups = rotated(groups, window, args.repeats * len(patterns)) if args.fresh_prompts else groups
                for name in names:
                    api = "service" if name == "service" else "vllm"
                    route = "/score" if api == "service" else "/classify"
                    bodies = payloads(window_groups, pattern, api, eos, MAX_LENGTH)
                    clients = PATTERNS[pattern][0]
                    summary = run_one(
                        servers[name], route, bodies, clients, args.warmup_s, args.duration_s, args.timeout_s
                    )
                    runs.append({"repeat": repeat, "pattern": pattern, "server": name, **summary})
                    lat = summary["latency_ms"]
                    print(
                        f"[{repeat}] {pattern:5} {name:14} {summary['texts_per_s']:7.2f} texts/s "
                        f"p50 {lat['p50']} p99 {lat['p99']} ms failed {summary['failed_requests']} "
                        f"{summary['errors'] or ''} {summary['counters']}",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.stop()
    report = {
        "machine": describe_machine(),
        "shape": args.shape,
        "data": source,
        "checkpoint": str(checkpoint),
        "texts": len(texts),
        "mean_tokens_per_text": statistics.mean(text_tokens),
        "mean_prompt_tokens": statistics.mean(prompt_tokens),
        "service_args": args.service_args,
        "dtype": args.dtype,
        "fresh_prompts": args.fresh_prompts,
        "runs": runs,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "grpo.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.output / "grpo.md").write_text(text)
    print(text)
    return 0


def markdown(report: dict[str, Any]) -> str:
    windows = "; each load window starting at prompts no earlier window sent" if report["fresh_prompts"] else ""
    lines = [
        f"Decoder reward model, random weights at {report['shape']}'s shape, {report['dtype']}; "
        f"{report['texts']} GRPO-shaped texts, "
        f"mean {report['mean_tokens_per_text']:.0f} tokens, {report['mean_prompt_tokens']:.0f} of them the prompt"
        f"{windows}.",
        cpu_line(report["machine"]),
        "",
        "| repeat | pattern | server | texts/s | p50 ms | p99 ms | failed | tokens computed / scored |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["runs"]:
        computed = computed_share(r["counters"])
        share = f"{computed:.2f}" if computed is not None else ""
        lat = r["latency_ms"]
        lines.append(
            f"| {r['repeat']} | {r['pattern']} | {r['server']} | {r['texts_per_s']:.2f} | {lat['p50']} | {lat['p99']} "
            f"| {r['failed_requests']} {r['errors'] or ''} | {share} |"
        )
    lines += [
        "",
        "| repeat | pattern | service ÷ vLLM with prefix cache | service ÷ vLLM without |",
        "|---|---|---:|---:|",
    ]
    by = {(r["repeat"], r["pattern"], r["server"]): r["texts_per_s"] for r in report["runs"]}
    for repeat, pattern in sorted({(r["repeat"], r["pattern"]) for r in report["runs"]}):
        service = by.get((repeat, pattern, "service"))
        cells = []
        for peer in ("vllm-prefix", "vllm-noprefix"):
            other = by.get((repeat, pattern, peer))
            cells.append(f"{service / other:.2f}" if service and other else "")
        lines.append(f"| {repeat} | {pattern} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
