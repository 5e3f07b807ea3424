"""Everything ``reward-serve`` can be told, as one settings object.

Every field is a command-line flag (``--max-batch-tokens 2048``) and an environment variable
(``REWARD_MAX_BATCH_TOKENS=2048``); flags win over the environment, the environment over the defaults.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.combination import COMPONENT_NAME, Combination, ScoresMode, parse_combination, plain_sum

Dtype = Literal["float32", "bfloat16", "float16"]
Device = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["debug", "info", "warning", "error"]


# Default padded tokens per forward pass (docs/benchmarks.md, "Batch budget"). On a CPU a float32 forward is no
# cheaper per token at ~16 texts of hh-rlhf length than at ~8, and with few requests waiting the smaller batches pad
# less. Half precision keeps getting cheaper per token with larger batches only where the CPU multiplies it in
# matrix units (AMX), so it gets twice the budget there and float32's elsewhere. A GPU wants far larger batches
# (text-embeddings-inference's default).
CPU_BATCH_TOKENS = 1024
CPU_MATRIX_UNIT_BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 16384


def cpu_batch_tokens(dtype: str, capabilities: Mapping[str, Any] | None = None) -> int:
    """The default budget on a CPU for ``dtype``; ``capabilities`` as ``torch.cpu.get_capabilities()`` reports them
    (this CPU's when omitted)."""
    from service.hardware import matrix_units

    return CPU_MATRIX_UNIT_BATCH_TOKENS if matrix_units(dtype, capabilities) else CPU_BATCH_TOKENS


def _named(entry: str) -> bool:
    """Whether a --model entry is NAME=PATH (a name of letters, digits, ``_ . -``, then ``=`` and a path)."""
    name, sep, path = entry.strip().partition("=")
    return bool(sep and path and COMPONENT_NAME.fullmatch(name))


class ServeSettings(BaseSettings):
    """How to serve a reward model (or several, combined): where, how to run it, how to batch, what to refuse."""

    model_config = SettingsConfigDict(
        env_prefix="REWARD_",
        cli_prog_name="reward-serve",
        cli_kebab_case=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        cli_implicit_flags=False,
        extra="ignore",
        validate_default=True,
    )

    # -- the model ------------------------------------------------------------------------------------------
    model: Annotated[list[str], NoDecode] = Field(
        description="checkpoint folder: a reward-train output or any HF sequence-classification folder; several "
        "reward models served as one: repeat it as NAME=PATH (--model helpful=/m/a --model harmless=/m/b; in the "
        "environment REWARD_MODEL='helpful=/m/a,harmless=/m/b' or a JSON list). The model flags below (dtype, "
        "backend, reward label, max length, workers, threads, ...) apply to every one of them"
    )
    combine: str | None = Field(
        None,
        description="with several models: the reward served, a linear expression over their names, e.g. "
        "'0.7*helpful + 0.3*harmless' (numbers, names, + - * /, parentheses; a name that is not an identifier in "
        "quotes); a model it does not name gets weight 0 (still served alone by /classify); default: the sum of all",
    )
    combine_scores: ScoresMode = Field(
        "raw",
        description="what --combine weighs: each model's raw score, or its score normalized with its manifest's "
        "training statistics (every weighted model then needs them)",
    )
    dtype: Dtype = Field("float32", description="weights and compute dtype")
    device: Device = Field("auto", description="auto picks cuda when available, else cpu")
    reward_label: str | None = Field(
        None, description="which logit is the reward, by label name or index (for multi-class classifiers)"
    )
    max_length: int | None = Field(
        None, ge=2, description="truncation length; only for checkpoints without reward_manifest.json"
    )
    truncation_side: Literal["left", "right"] | None = Field(
        None, description="which end to cut; only for checkpoints without reward_manifest.json"
    )
    backend: Literal["torch", "onnx", "auto"] = Field(
        "auto",
        description="what runs the forward pass: torch (transformers, eager), onnx (the model exported to ONNX "
        "Runtime, float32 on a CPU; needs the onnx extra; falls back to torch with a warning when the model cannot "
        "be exported or its exported scores differ), or auto: onnx for a float32 model on a CPU when onnxruntime "
        "is installed, else torch. Decoders compute shared prompt prefixes once on either (onnx: a graph with past "
        "keys and values)",
    )
    prefix_cache_mb: int = Field(
        512,
        ge=0,
        description="decoder models only: memory (MiB, on the model's device) for the keys and values of prompt "
        "prefixes already computed, so that texts sharing a prompt (a GRPO group sent one text per request) compute "
        "it once; least recently used out; 0 turns it off (prefixes are still shared within a forward). 512 MiB holds "
        "the prompts of the groups in flight under 64 clients for models up to ~1B parameters in float32",
    )
    inference_workers: int | None = Field(
        None,
        ge=1,
        description="threads that each form and compute their own batches from the one queue; default: 2 on a CPU "
        "with at least 2 torch threads (two half-width forwards outrun one), 1 on a GPU",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="torch intra-op threads per inference worker; default on a CPU: torch's threads "
        "(OMP_NUM_THREADS, else the physical cores) divided among the workers; on a GPU torch's choice",
    )

    # -- the network ----------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address to bind (a container sets 0.0.0.0 explicitly)")
    port: int = Field(8000, ge=0, le=65535, description="port to bind (0 picks a free one)")
    api_key: SecretStr | None = Field(
        None,
        description="when set, scoring routes require 'Authorization: Bearer KEY' (or KEY as the password of a URL's "
        "credentials, http://user:KEY@host/...); probes and metrics stay open",
    )
    log_level: LogLevel = Field("info", description="log level")
    opentelemetry: bool = Field(
        False,
        description="FastAPI's native OpenTelemetry traces, metrics and logs, sent to the globally configured "
        "providers (e.g. under opentelemetry-instrument); off by default: its per-request check costs event-loop time",
    )

    reward_telemetry: bool = Field(
        True,
        description="export what the delivered rewards look like in /metrics (score histogram, length-score "
        "correlation, truncation, drift from the manifest's normalization; docs/telemetry.md)",
    )
    reward_telemetry_window: int = Field(
        1000, ge=2, description="how many recent items the telemetry's correlation, mean, std and drift cover"
    )

    # -- batching -------------------------------------------------------------------------------------------
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="padded tokens per forward pass (longest item x items); default on a CPU: 1024, and 2048 for "
        "bfloat16/float16 where the CPU has matrix units for them (AMX); 16384 on a GPU",
    )
    max_batch_size: int = Field(32, ge=1, description="items per forward pass")
    max_wait_ms: float = Field(5.0, ge=0, description="how long a short queue waits for more items before a forward")
    batch_overhead_tokens: int = Field(
        0,
        ge=0,
        description="a forward pass's fixed cost in tokens: a batch stops growing when one more item would lower "
        "real tokens / (this + padded tokens); 0 fills batches to the limits",
    )

    batch_window_items: int | None = Field(
        None,
        ge=0,
        description="a batch's items are chosen (by length, around the oldest) among this many oldest waiting "
        "items; bounds how often a text is overtaken, and so the latency tail; 0 chooses among all waiting items; "
        "default: 1 (first come, first served, one text per forward) when the backend computes each text unpadded "
        "(onnx), else 0 (grouping by length saves padding)",
    )

    # -- limits ---------------------------------------------------------------------------------------------
    # Sized for a whole rollout step of an RL trainer (docs/frameworks.md, "Sizes and refusals"): a trainer has one
    # step in flight at a time and retries every refusal a few times before it gives up, so a queue or a request
    # that cannot hold one step stalls or fails training, while one that holds it only refuses a runaway client.
    max_queue_tokens: int = Field(
        4_194_304,
        ge=1,
        description="tokens allowed to wait (a rollout step: 8192 texts of 512 tokens); a request that would exceed "
        "it gets 429 + Retry-After, one that alone exceeds it 413",
    )
    max_items_per_request: int = Field(
        16_384,
        ge=1,
        description="items (or pairs, or queries) per request; 422 beyond (OpenRLHF up to 0.9.0 posts a whole "
        "rollout step, rollout batch x samples per prompt, in one request)",
    )
    max_body_bytes: int = Field(
        128 * 1024 * 1024, ge=1, description="request body size (a rollout step of 8192 long samples); 413 beyond"
    )
    max_text_chars: int = Field(200_000, ge=1, description="characters per text field; 422 beyond")
    request_timeout_s: float = Field(
        180.0,
        gt=0,
        description="a request not answered in time gets 504 and its queued items are dropped (the RL trainers' own "
        "clients wait 120-180 s); one that the measured speed says cannot be answered in time (the tokens queued "
        "ahead of it and its own) is refused at once with 429 and a Retry-After instead",
    )
    drain_timeout_s: float = Field(
        30.0, ge=0, description="on SIGTERM, how long accepted requests may take to finish before the process exits"
    )

    @field_validator("model", mode="before")
    @classmethod
    def _models_as_list(cls, value: Any) -> Any:
        """One path; several NAME=PATH entries separated by commas (the environment's form); or a JSON list."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except ValueError as exc:
                raise ValueError(f"not a JSON list of NAME=PATH entries: {exc}") from None
        # The command line hands repeated flags over joined by commas too. A single path may hold a comma.
        if "," in text and any(_named(part) for part in text.split(",")):
            return [part.strip() for part in text.split(",")]
        return [text]

    @model_validator(mode="after")
    def _components_and_combination(self) -> ServeSettings:
        components = self.components
        names = [name for name, _ in components if name is not None]
        if not components:
            raise ValueError("--model: at least one checkpoint folder is needed")
        if len(components) > 1 and len(names) < len(components):
            unnamed = [path for name, path in components if name is None]
            raise ValueError(f"several --model given: name every one as NAME=PATH (unnamed: {', '.join(unnamed)})")
        if len(set(names)) < len(names):
            raise ValueError(f"--model: component names must be unique, got {', '.join(names)}")
        if "truncated" in names:
            raise ValueError("--model: 'truncated' is reserved (OpenRLHF's extra_logs has a key of that name)")
        if self.combine is not None and not names:
            raise ValueError("--combine needs named models: --model NAME=PATH")
        self.combination  # noqa: B018 - a bad expression is a settings error
        return self

    @property
    def components(self) -> list[tuple[str | None, str]]:
        """(name, path) of each model to serve, in order; the name is None for a single unnamed --model PATH."""
        out = []
        for entry in self.model:
            name, _, path = entry.partition("=")
            out.append((name, path) if _named(entry) else (None, entry))
        return out

    @property
    def combination(self) -> Combination | None:
        """The combination served, or None when one model is served as it is."""
        names = [name or "" for name, _ in self.components]
        if len(names) == 1 and self.combine is None:
            return None
        if self.combine is None:
            return plain_sum(names, self.combine_scores)
        return parse_combination(self.combine, names, self.combine_scores)

    @field_validator("reward_label", mode="before")
    @classmethod
    def _label_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> ServeSettings:
        if self.max_batch_tokens is not None and self.max_queue_tokens < self.max_batch_tokens:
            raise ValueError(
                f"max_queue_tokens ({self.max_queue_tokens}) must be at least "
                f"max_batch_tokens ({self.max_batch_tokens})"
            )
        return self

    def batch_tokens_for(self, device: str, dtype: str, capabilities: Mapping[str, Any] | None = None) -> int:
        """``max_batch_tokens`` as set, else the default for where and how the model runs (within the queue's limit):
        on a CPU it depends on the dtype and on whether the CPU has matrix units for it (``capabilities``: this
        CPU's when omitted), see :func:`cpu_batch_tokens`."""
        if self.max_batch_tokens is not None:
            return self.max_batch_tokens
        tokens = GPU_BATCH_TOKENS if device.startswith("cuda") else cpu_batch_tokens(dtype, capabilities)
        return min(tokens, self.max_queue_tokens)

    def public_dict(self) -> dict[str, Any]:
        """The settings without secrets, for logs and /info."""
        data = self.model_dump(exclude={"api_key"})
        data["api_key"] = "set" if self.api_key is not None else None
        return data
