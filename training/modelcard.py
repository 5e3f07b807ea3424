"""The README model card written into every checkpoint: data, metrics, recipe, how to serve it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def render_model_card(manifest: dict[str, Any]) -> str:
    ev, norm, fmt, tr = manifest["eval"], manifest["normalization"], manifest["formatting"], manifest["training"]
    args = tr["arguments"]
    versions = ", ".join(f"{k} {v}" for k, v in tr["versions"].items())
    return f"""---
library_name: transformers
pipeline_tag: text-classification
tags: [reward-model, rlhf, trl, reward-service]
base_model: {manifest["base_model"]}
---

# {manifest["name"]}: a reward model

A sequence-classification reward model (one output: the reward) trained with TRL's `RewardTrainer` by
`reward-train` from preference pairs, on top of `{manifest["base_model"]}`.

## Data
- Training: `{args["script"]["dataset_name"]}`, {tr["n_train"]} pairs ({tr["train_truncated"]} truncated, none dropped),
  fingerprint `{tr["data_fingerprint"][:16]}`.
- Evaluation: {ev["source"]}, {ev["n"]} pairs.

## Metrics
| metric | value |
|---|---|
| held-out pairwise accuracy | {ev["accuracy"]:.4f} |
| held-out mean margin (r_chosen − r_rejected) | {ev["mean_margin"]:.4f} |
| held-out pairs truncated | {ev["truncated"]} |
| training accuracy | {tr["train_accuracy"]:.4f} |
| reward mean / std over training pairs | {norm["mean"]:.4f} / {norm["std"]:.4f} |
| training time | {tr["train_seconds"]} s on {tr["device"]} |

## Formatting (how text becomes token ids)
`{fmt["architecture"]}` recipe, max_length {fmt["max_length"]}, truncation from the {fmt["truncation_side"]},
eos appended: {fmt["append_eos"]}, chat template: {"yes" if fmt.get("chat_template") else "none"}.
The full recipe is in `reward_manifest.json`; score only through it (the `reward-serve` service does).

## Serve it
```bash
reward-serve --model {manifest["name"]} --port 8000
curl -s localhost:8000/score -H 'content-type: application/json' \\
  -d '{{"items": [{{"prompt": "How do I boil an egg?", "response": "Simmer it for nine minutes."}}]}}'
```

Library versions: {versions}.

<details><summary>Training arguments</summary>

```json
{json.dumps(args["training"], indent=1, default=str)[:20000]}
```
</details>
"""


def write_model_card(path: str | Path, manifest: dict[str, Any]) -> Path:
    file = Path(path) / "README.md"
    file.write_text(render_model_card(manifest))
    return file
