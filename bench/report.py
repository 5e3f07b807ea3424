"""The benchmark's outputs: ``bench.json`` (everything), ``bench.md`` (tables) and ``bench.png`` (throughput per
scenario, latency distribution per scenario)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONTAMINATED_CORES = 0.3  # others' CPU above which a scenario is flagged as measured on a shared machine
ORDER = (
    "ceiling",
    "service_64x1",
    "service_4x64",
    "service_open",
    "naive_64x1",
    "naive_4x64",
    "naive_open",
    "vllm_64x1",
    "vllm_4x64",
    "vllm_open",
)


def _f(x: Any, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def cpu_line(machine: dict[str, Any]) -> str:
    """The CPU a report's figures came from, e.g. ``AMD EPYC (x86_64, AVX512, avx512_bf16, no AMX), 2 CPUs``."""
    from service.hardware import cpu_summary

    cpu = machine.get("cpu") or {"model": machine.get("cpu_model", "?"), "usable_cpus": machine.get("cpus")}
    return cpu_summary(cpu)


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    t = report["texts"]
    c = report["checkpoint"]
    lines = [
        "# Reward service throughput benchmark",
        "",
        f"`{report['command']}` — started {report['started']}, {report['seconds']} s"
        + (f" — {report['label']}" if report.get("label") else ""),
        "",
        f"- Machine: {cpu_line(m)} ({', '.join(m.get('cpu_flags', []))}), "
        f"{m.get('memory_gib', '?')} GiB; torch {m.get('torch')} ({m.get('torch_threads')} threads), "
        f"transformers {m.get('transformers')}, uvicorn {m.get('uvicorn')}, Python {m.get('python')}",
        f"- Load: before the run {report['load_before']['busy_cores']} busy cores (loadavg "
        f"{report['load_before']['loadavg_1_5_15']}), after {report['load_after']['busy_cores']} "
        f"(loadavg {report['load_after']['loadavg_1_5_15']})",
        f"- Checkpoint: {c.get('name')} ({c.get('base_model')}), max_length {c.get('max_length')}",
        f"- Texts: {t['n']} from {t['source']}; tokens median {t.get('tokens_median')}, p90 {t.get('tokens_p90')}, "
        f"max {t.get('tokens_max')}, {t.get('truncated')} truncated",
        "",
    ]
    for dtype, run in report["runs"].items():
        s = run["scenarios"]
        lines += [
            f"## {dtype}",
            "",
            "| scenario | what | texts/s | tokens/s | p50 ms | p95 ms | p99 ms | items/forward | padding eff. "
            "| forward busy | padded tok/s in forward | × ceiling | × naive | server cores | loop cores "
            "| others' cores |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name in ORDER:
            if name not in s:
                continue
            r = s[name]
            lat = r.get("latency_ms") or {}
            cpu = r.get("cpu") or {}
            server_cores = cpu.get("server_cores", cpu.get("bench_process_cores"))
            errors = sum((r.get("errors") or {}).values())
            what = r["description"] + (f" ({errors} errors)" if errors else "")
            if (cpu.get("others_cores") or 0) > CONTAMINATED_CORES:
                what += " ⚠ machine shared"
            lines.append(
                f"| {name} | {what} | {_f(r['texts_per_s'])} | {_f(r['tokens_per_s'], 0)} | {_f(lat.get('p50'), 0)} "
                f"| {_f(lat.get('p95'), 0)} | {_f(lat.get('p99'), 0)} | {_f(r.get('mean_items_per_forward'))} "
                f"| {_f(r.get('padding_efficiency'), 2)} | {_f(r.get('forward_busy'), 2)} "
                f"| {_f(r.get('forward_padded_tokens_per_s'), 0)} | {_f(r.get('ratio_to_ceiling'), 2)} "
                f"| {_f(r.get('ratio_to_naive'), 2)} | {_f(server_cores, 2)} "
                f"| {_f(cpu.get('server_main_thread_cores'), 2)} | {_f(cpu.get('others_cores'), 2)} |"
            )
        if "ceiling" in s:
            sweep = ", ".join(
                f"{k} {v['texts_per_s']:.1f}/s (pad eff {v['padding_efficiency']:.2f}"
                + (f", {v['texts_per_cpu_s']:.1f} per CPU-second)" if v.get("texts_per_cpu_s") else ")")
                for k, v in s["ceiling"]["sweep"].items()
            )
            lines += ["", f"Ceiling sweep (in-process, texts/s): {sweep}."]
            check = s["ceiling"].get("scores_vs_torch")
            if check:
                lines += [
                    "",
                    f"The service's forward ({check['forward']}) against the checkpoint in transformers, every text of "
                    f"the pool: largest score difference {check['max_abs_diff']:.2g} over {check['texts']} texts.",
                ]
            if "timings" in s["ceiling"]:
                c = s["ceiling"]
                around = "; ".join(
                    f"{name} {r['ceiling_around']['before']:.1f} → {r['ceiling_around']['after']:.1f}"
                    for name, r in s.items()
                    if "ceiling_around" in r
                )
                lines += [
                    "",
                    f"Ceiling ({c['best']}) timed before the first load scenario and after each one "
                    f"(texts/s): {around}. Each scenario's × ceiling uses the mean of the timings just "
                    f"before and after it; the ceiling row shows the mean of all {len(c['timings'])}.",
                ]
        lines += peer_table(run)
        if "accuracy" in run:
            a = run["accuracy"]
            lines += ["", f"Held-out accuracy ({a['n']} pairs, {a['source']}): {a['accuracy']:.4f}."]
        lines.append("")
    for dtype, entry in report.get("cross_dtype", {}).items():
        lines += [f"## {dtype} against float32", ""]
        lines += [f"- {name}: {ratio:.2f} × float32" for name, ratio in entry["throughput_ratio"].items()]
        if "accuracy_points" in entry:
            lines.append(
                f"- held-out accuracy: {entry['accuracy_points']:+.2f} points; {entry['preference_flips']} "
                f"pairs change preference; largest score difference {entry['max_abs_score_diff']:.4f}"
            )
        lines.append("")
    if report.get("targets"):
        lines += ["## Targets", "", "| dtype | target | want | got | met |", "|---|---|---|---:|---|"]
        for row in report["targets"]:
            lines.append(
                f"| {row['dtype']} | {row['target']} | {row['want']} | {row['got']} | {'yes' if row['met'] else 'NO'} |"
            )
        lines.append("")
    lines += [
        "Columns: texts/s and real (non-pad) tokens/s completed inside the measurement window; latency per request "
        "(closed loop: send to answer; open loop: from the scheduled send time); items/forward and padding "
        "efficiency (real ÷ padded tokens) per forward pass from the server's /metrics; forward busy = share of "
        "the window the model was computing, padded tok/s in forward = padded tokens ÷ forward seconds (lower than "
        "the ceiling's: forwards slowed by other work on the CPU, or smaller batches); server cores = CPU used by "
        "the server process (for the ceiling: the benchmark process), loop cores = its main (event-loop) thread, "
        "others' cores = the rest of the machine (not ours) during the scenario; ⚠ marks a scenario during "
        f"which others used more than {CONTAMINATED_CORES} cores (not comparable).",
        "",
    ]
    return "\n".join(lines)


def peer_table(run: dict[str, Any]) -> list[str]:
    """The service against vLLM, pair by pair in the order they ran (interleaved), with each pair's ratio."""
    s = run["scenarios"]
    pairs = [
        (name, name.replace("service_", "vllm_", 1))
        for name in s
        if name.startswith("service_") and name.replace("service_", "vllm_", 1) in s
    ]
    if not pairs:
        return []
    lines = [
        "",
        "Against vLLM (the pairs ran back to back, in this order):",
        "",
        "| load | service texts/s | vLLM texts/s | × vLLM | service p50 / p99 ms | vLLM p50 / p99 ms "
        "| others' cores (service, vLLM) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ours, theirs in pairs:
        a, b = s[ours], s[theirs]
        la, lb = a.get("latency_ms") or {}, b.get("latency_ms") or {}
        lines.append(
            f"| {ours.removeprefix('service_')} | {_f(a['texts_per_s'])} | {_f(b['texts_per_s'])} "
            f"| {_f(a.get('ratio_to_vllm'), 2)} | {_f(la.get('p50'), 0)} / {_f(la.get('p99'), 0)} "
            f"| {_f(lb.get('p50'), 0)} / {_f(lb.get('p99'), 0)} "
            f"| {_f((a.get('cpu') or {}).get('others_cores'), 2)}, {_f((b.get('cpu') or {}).get('others_cores'), 2)} |"
        )
    if "vllm_scores" in run:
        v = run["vllm_scores"]
        lines += [
            "",
            f"vLLM's raw logits for the first {v['texts']} texts against the checkpoint's own scores: largest "
            f"difference {_f(v['max_abs_diff'], 8)} on texts within the max length; "
            f"{_f(v['max_abs_diff_truncated'], 4)} on the {v['truncated_texts']} longer ones (vLLM's "
            "truncate_prompt_tokens cuts them elsewhere than the checkpoint's recipe; the cost is the same).",
        ]
    return lines


def plot(report: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    runs = report["runs"]
    dtypes = list(runs)
    names = [n for n in ORDER if any(n in r["scenarios"] for r in runs.values())]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    width = 0.8 / max(1, len(dtypes))
    for k, dtype in enumerate(dtypes):
        s = runs[dtype]["scenarios"]
        values = [s[n]["texts_per_s"] if n in s else 0 for n in names]
        xs = [i + (k - (len(dtypes) - 1) / 2) * width for i in range(len(names))]
        bars = ax1.bar(xs, values, width, label=dtype)
        for x, v in zip(xs, values, strict=True):
            if v:
                ax1.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        if "ceiling" in s:
            ax1.axhline(s["ceiling"]["texts_per_s"], color=bars.patches[0].get_facecolor(), ls="--", lw=0.8)
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax1.set_ylabel("texts/s")
    ax1.set_title("Throughput per scenario (dashed: in-process ceiling)")
    ax1.legend()

    data, labels = [], []
    for dtype in dtypes:
        s = runs[dtype]["scenarios"]
        for n in names:
            if n in s and s[n].get("latencies_ms"):
                data.append(s[n]["latencies_ms"])
                labels.append(f"{n}\n{dtype}" if len(dtypes) > 1 else n)
    if data:
        ax2.boxplot(data, whis=(1, 99), showfliers=False)
        ax2.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=8)
        ax2.set_yscale("log")
    ax2.set_ylabel("request latency, ms (log)")
    ax2.set_title("Latency per request (box: p25-p75, whiskers: p1-p99)")
    m = report["machine"]
    fig.suptitle(
        f"{report['checkpoint'].get('name')} on {cpu_line(m)}, {report['texts']['n']} texts, {report['started']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_all(report: dict[str, Any], output: Path) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    paths = [output / "bench.json", output / "bench.md"]
    paths[0].write_text(json.dumps(report, indent=1) + "\n")
    paths[1].write_text(markdown(report))
    png = plot(report, output / "bench.png")
    if png is not None:
        paths.append(png)
    return paths
