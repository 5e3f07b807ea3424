"""Builds reward-dashboard.json, the Grafana dashboard of the reward telemetry, with grafanalib.

    python k8s/overlays/monitoring/dashboard.py > k8s/overlays/monitoring/reward-dashboard.json

grafanalib checks every panel, target and variable as it builds them (its attrs validators); the test suite checks
that the committed JSON is this script's output and that every series it plots is one the service exports.
What each series means and what to do when it moves: docs/telemetry.md.
"""

from __future__ import annotations

import json

from grafanalib._gen import DashboardEncoder
from grafanalib.core import Dashboard, GridPos, Target, Template, Templating, Threshold, TimeSeries

SELECTOR = 'model=~"$model"'
# Items delivered: the score histogram's +Inf bucket (a histogram with negative buckets exposes no _count or _sum).
DELIVERED = f'reward_score_bucket{{le="+Inf",{SELECTOR}}}'
BY = "model, version"


def panel(title: str, description: str, targets: list[tuple[str, str]], pos: tuple[int, int], **options) -> TimeSeries:
    x, y = pos
    return TimeSeries(
        title=title,
        description=description,
        dataSource="${datasource}",
        targets=[
            Target(expr=expr, legendFormat=legend, refId=chr(ord("A") + i)) for i, (expr, legend) in enumerate(targets)
        ],
        gridPos=GridPos(h=8, w=12, x=x, y=y),
        **options,
    )


def thresholds(*steps: tuple[float | None, str]) -> list[Threshold]:
    return [Threshold(color, index, value if value is not None else 0.0) for index, (value, color) in enumerate(steps)]


def build() -> Dashboard:
    quantile = "histogram_quantile({q}, sum by (le, {by}) (rate(reward_score_bucket{{{sel}}}[5m])))"
    return Dashboard(
        title="Reward service: reward telemetry",
        uid="reward-telemetry",
        description="What the delivered rewards look like, per model and version (docs/telemetry.md)",
        tags=["reward-service"],
        timezone="utc",
        schemaVersion=39,
        templating=Templating(
            list=[
                Template(name="datasource", label="Data source", query="prometheus", type="datasource"),
                Template(
                    name="model",
                    label="Model",
                    query="label_values(reward_score_bucket, model)",
                    dataSource="${datasource}",
                    includeAll=True,
                    multi=True,
                    default="$__all",
                ),
            ]
        ),
        panels=[
            panel(
                "Raw score quantiles",
                "p10 / p50 / p90 of the raw scores delivered (histogram, 5 min rate): the shape of the rewards",
                [
                    (quantile.format(q=q, by=BY, sel=SELECTOR), f"p{int(q * 100)} {{{{model}}}} {{{{version}}}}")
                    for q in (0.1, 0.5, 0.9)
                ],
                (0, 0),
            ),
            panel(
                "Live mean and std vs training",
                "mean and std of the last N raw scores, and the manifest's training normalization",
                [
                    (f"reward_score_window_mean{{{SELECTOR}}}", "live mean {{model}} {{version}}"),
                    (f"reward_score_training_mean{{{SELECTOR}}}", "training mean {{model}} {{version}}"),
                    (f"reward_score_window_std{{{SELECTOR}}}", "live std {{model}} {{version}}"),
                    (f"reward_score_training_std{{{SELECTOR}}}", "training std {{model}} {{version}}"),
                ],
                (12, 0),
            ),
            panel(
                "Drift (z)",
                "(live mean - training mean) / training std; beyond +-1 the policy's outputs score unlike training's",
                [
                    (f"reward_score_drift_z{{{SELECTOR}}}", "drift z {{model}} {{version}}"),
                    (f"reward_score_std_ratio{{{SELECTOR}}}", "std ratio {{model}} {{version}}"),
                ],
                (0, 8),
                thresholds=thresholds((None, "green"), (1.0, "orange"), (2.0, "red")),
                thresholdsStyleMode="line",
            ),
            panel(
                "Length-score correlation",
                "Pearson r of token count and raw score over the last N items; rising towards +1 during RL is the "
                "classic sign of length hacking",
                [(f"reward_length_score_correlation{{{SELECTOR}}}", "r {{model}} {{version}}")],
                (12, 8),
                valueMin=-1,
                valueMax=1,
                thresholds=thresholds((None, "green"), (0.3, "orange"), (0.5, "red")),
                thresholdsStyleMode="line",
            ),
            panel(
                "Truncated share",
                "share of items cut to the model's max_length: over the last N items, and over 5 min",
                [
                    (f"reward_truncated_window_ratio{{{SELECTOR}}}", "last N {{model}} {{version}}"),
                    (
                        f"sum by ({BY}) (rate(reward_truncated_items_total{{{SELECTOR}}}[5m])) / "
                        f"sum by ({BY}) (rate({DELIVERED}[5m]))",
                        "5 min {{model}} {{version}}",
                    ),
                ],
                (0, 16),
                unit="percentunit",
                valueMin=0,
                valueMax=1,
            ),
            panel(
                "Scores delivered per second",
                "items scored and delivered, by model and version",
                [(f"sum by ({BY}) (rate({DELIVERED}[5m]))", "{{model}} {{version}}")],
                (12, 16),
                unit="ops",
            ),
        ],
    ).auto_panel_ids()


def render() -> str:
    return json.dumps(build().to_json_data(), cls=DashboardEncoder, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    print(render(), end="")
