"""The suite runs offline and quietly, and every module gets the fixtures of the :mod:`tests.fixtures` plugin."""

from __future__ import annotations

import os

# Registered once, here: a test names these fixtures as parameters without importing them.
pytest_plugins = ["tests.fixtures.models", "tests.fixtures.servers"]

# Everything runs offline and quietly; subprocesses inherit this.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_DISABLED": "true",
    "WANDB_MODE": "disabled",
    "DISABLE_MLFLOW_INTEGRATION": "TRUE",
}.items():
    os.environ.setdefault(_key, _value)
