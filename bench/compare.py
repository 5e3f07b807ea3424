"""What a benchmark run's numbers mean side by side: each scenario against the ceiling timed around it, the
service against the naive server and vLLM, a second dtype against float32, and all of it against the project's
performance goals."""

from __future__ import annotations

import statistics
from typing import Any

# The project's performance goals, checked in every report (MiniLM reward model on a CPU, fp32 unless said).
TARGETS = {
    "service_64x1_vs_ceiling": 0.90,
    "service_4x64_vs_ceiling": 0.95,
    "service_4x64_vs_naive": 3.0,
    "service_64x1_vs_naive": 1.0,
    "bf16_vs_fp32": 1.7,
    "bf16_accuracy_points": 0.5,
}


def ratios(s: dict[str, Any]) -> dict[str, float]:
    def tput(name: str) -> float | None:
        return s[name]["texts_per_s"] if name in s and s[name]["texts_per_s"] else None

    out = {}
    for name in [n for n in s if n != "ceiling"]:
        # the ceiling timed just before and after this scenario, else the ceiling row
        ceiling = s[name]["ceiling_around"]["mean"] if "ceiling_around" in s.get(name, {}) else tput("ceiling")
        if tput(name) and ceiling:
            out[f"{name}_vs_ceiling"] = tput(name) / ceiling
            s[name]["ratio_to_ceiling"] = out[f"{name}_vs_ceiling"]
    for kind in ("64x1", "4x64", "open"):
        a, b = tput(f"service_{kind}"), tput(f"naive_{kind}")
        if a and b:
            out[f"service_{kind}_vs_naive"] = a / b
            s[f"service_{kind}"]["ratio_to_naive"] = a / b
        # Against vLLM: each interleaved pair (service_64x1#2 with vllm_64x1#2), and their median.
        pairs = []
        for suffix in [""] + [f"#{i}" for i in range(2, 100)]:
            a, b = tput(f"service_{kind}{suffix}"), tput(f"vllm_{kind}{suffix}")
            if not (a and b):
                break
            pairs.append(a / b)
            s[f"service_{kind}{suffix}"]["ratio_to_vllm"] = a / b
        if pairs:
            out[f"service_{kind}_vs_vllm"] = statistics.median(pairs)
            out[f"service_{kind}_vs_vllm_each"] = pairs
    return out


def cross_dtype(runs: dict[str, Any]) -> dict[str, Any]:
    """bf16 (or any second dtype) against float32: throughput ratios per scenario and the accuracy difference."""
    if "float32" not in runs:
        return {}
    base = runs["float32"]
    out: dict[str, Any] = {}
    for dtype, run in runs.items():
        if dtype == "float32":
            continue
        entry: dict[str, Any] = {"throughput_ratio": {}}
        for name, scenario in run["scenarios"].items():
            ref = base["scenarios"].get(name)
            if ref and ref.get("texts_per_s") and scenario.get("texts_per_s"):
                entry["throughput_ratio"][name] = scenario["texts_per_s"] / ref["texts_per_s"]
        if "accuracy" in run and "accuracy" in base:
            a, b = run["accuracy"], base["accuracy"]
            entry["accuracy_points"] = 100 * (a["accuracy"] - b["accuracy"])
            flips = sum(
                (c1 > r1) != (c0 > r0)
                for c1, r1, c0, r0 in zip(
                    a["chosen_scores"], a["rejected_scores"], b["chosen_scores"], b["rejected_scores"], strict=True
                )
            )
            entry["preference_flips"] = flips
            entry["max_abs_score_diff"] = max(
                abs(x - y)
                for x, y in zip(
                    a["chosen_scores"] + a["rejected_scores"], b["chosen_scores"] + b["rejected_scores"], strict=True
                )
            )
        out[dtype] = entry
    return out


def targets(runs: dict[str, Any], cross: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for dtype, run in runs.items():
        r = run["ratios"]
        for key in (
            "service_64x1_vs_ceiling",
            "service_4x64_vs_ceiling",
            "service_4x64_vs_naive",
            "service_64x1_vs_naive",
        ):
            if key in r:
                rows.append(
                    {
                        "dtype": dtype,
                        "target": key,
                        "want": f">= {TARGETS[key]}",
                        "got": round(r[key], 3),
                        "met": r[key] >= TARGETS[key],
                    }
                )
    for dtype, entry in cross.items():
        for name, ratio in entry["throughput_ratio"].items():
            rows.append(
                {
                    "dtype": dtype,
                    "target": f"{name}_vs_float32",
                    "want": f">= {TARGETS['bf16_vs_fp32']}",
                    "got": round(ratio, 3),
                    "met": ratio >= TARGETS["bf16_vs_fp32"],
                }
            )
        if "accuracy_points" in entry:
            pts = entry["accuracy_points"]
            rows.append(
                {
                    "dtype": dtype,
                    "target": "accuracy_points_vs_float32",
                    "want": f"within {TARGETS['bf16_accuracy_points']}",
                    "got": round(pts, 2),
                    "met": abs(pts) <= TARGETS["bf16_accuracy_points"],
                }
            )
    return rows
