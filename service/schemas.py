"""Request and response bodies. Validation lives here, so a 422 names the field that is wrong."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator


def _unicode_text(value: str) -> str:
    """JSON may carry lone surrogates (``"\\ud800"``); they are not text, and no tokenizer takes them."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"not valid Unicode text: a lone surrogate (U+{ord(value[exc.start]):04X}) at position {exc.start}"
        ) from None
    return value


# A string that a tokenizer can take: strict (no coercion from numbers) and valid Unicode.
Text = Annotated[StrictStr, AfterValidator(_unicode_text)]


class Message(BaseModel):
    """One chat message; other keys (``name``, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")

    role: Text
    content: Text


class ScoreItem(BaseModel):
    """Exactly one of: ``text``; ``prompt`` + ``response``; ``messages``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"prompt": "2+2=", "response": "4"}]})

    text: Text | None = None
    prompt: Text | None = None
    response: Text | None = None
    messages: list[Message] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one_shape(self) -> ScoreItem:
        present = [k for k in ("text", "prompt", "response", "messages") if getattr(self, k) is not None]
        if present in (["text"], ["prompt", "response"], ["messages"]):
            return self
        if not present:
            raise ValueError("an item needs one of: 'text', 'prompt' + 'response', or 'messages'")
        raise ValueError(
            f"an item must have exactly one shape ('text' | 'prompt' + 'response' | 'messages'), got {present}"
        )

    def as_item(self) -> dict[str, Any]:
        """The plain dict the formatting contract takes."""
        if self.text is not None:
            return {"text": self.text}
        if self.messages is not None:
            return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}
        return {"prompt": self.prompt, "response": self.response}

    def texts(self) -> list[tuple[str, str]]:
        """(field path, text) for every string in the item, for the per-text character cap."""
        if self.messages is not None:
            return [(f"messages.{i}.content", m.content) for i, m in enumerate(self.messages)]
        return [(k, getattr(self, k)) for k in ("text", "prompt", "response") if getattr(self, k) is not None]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[ScoreItem] = Field(min_length=1, description="the texts to score")
    normalize: StrictBool = Field(False, description="return (score - mean) / std with the manifest's statistics")


class ScoreResponse(BaseModel):
    scores: list[float]
    truncated: list[bool] = Field(description="whether each item was cut to the model's max_length")
    model: str
    model_version: str
    normalized: bool = False


Side = Text | list[Message]


class PreferencePair(BaseModel):
    """A preference pair in TRL's shape: ``chosen`` and ``rejected`` (texts or messages), optional ``prompt``."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text | list[Message] | None = None
    chosen: Side
    rejected: Side

    def as_row(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            if isinstance(value, list):
                return [{"role": m.role, "content": m.content} for m in value]
            return value

        return {"prompt": plain(self.prompt), "chosen": plain(self.chosen), "rejected": plain(self.rejected)}

    def texts(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for name in ("prompt", "chosen", "rejected"):
            value = getattr(self, name)
            if isinstance(value, str):
                out.append((name, value))
            elif isinstance(value, list):
                out.extend((f"{name}.{i}.content", m.content) for i, m in enumerate(value))
        return out


class CompareRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pairs: list[PreferencePair] = Field(min_length=1)


class CompareResponse(BaseModel):
    margins: list[float] = Field(description="r(chosen) - r(rejected)")
    probabilities: list[float] = Field(description="sigmoid(margin): P(chosen is preferred)")
    chosen_scores: list[float]
    rejected_scores: list[float]
    model: str
    model_version: str


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward model protocol (``--remote_rm_url``, ``--reward.remote_url``)."""

    model_config = ConfigDict(extra="allow")

    query: list[Text] = Field(
        description="full texts (prompt + response, as decoded by the trainer); may be empty (a shard with no samples)"
    )
    prompts: list[Any] | None = Field(None, description="accepted and ignored")
    labels: list[Any] | None = Field(None, description="accepted and ignored")


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float] = Field(description="the same values as rewards")
    extra_logs: dict[str, list[float]] = Field(
        default_factory=dict,
        description="per-sample values for the trainer's logs: truncated (1.0 if cut to max_length)",
    )


class CpuInfo(BaseModel):
    """The CPU the service runs on (:func:`service.hardware.describe_cpu`): speeds and the bfloat16 advice depend
    on it."""

    model: str = Field(description="the CPU's name, from /proc/cpuinfo or torch's CPU detection")
    architecture: str = Field(description="x86_64, aarch64, ...")
    isa: str = Field(description="the widest vector instruction set torch's kernels use: DEFAULT, AVX2, AVX512, ...")
    amx: bool = Field(description="matrix units for bfloat16 (Intel AMX)")
    avx512_bf16: bool = Field(description="AVX-512 bfloat16 instructions")
    physical_cores: int | None = Field(None, description="physical cores of the machine")
    logical_cpus: int | None = Field(None, description="logical CPUs of the machine")
    usable_cpus: int = Field(description="CPUs this process may run on (a container's share)")


class InfoResponse(BaseModel):
    model: str
    model_version: str
    source: str
    dtype: str
    device: str
    has_manifest: bool
    base_model: str | None = None
    reward_label: str | None = None
    formatting: dict[str, Any]
    normalization: dict[str, Any] | None = None
    batching: dict[str, Any]
    limits: dict[str, Any]
    ready: bool
    cpu: CpuInfo


class SlimeRewardRequest(BaseModel):
    """slime's remote reward model request (``--rm-type remote_rm --rm-url``): one sample per POST."""

    model_config = ConfigDict(extra="allow")

    prompt: Text | Annotated[list[Message], Field(min_length=1)] = Field(
        description="the prompt as a string (scored as prompt + response) or chat messages (the response is "
        "appended as the assistant's turn)"
    )
    response: Text
    label: Any = Field(None, description="accepted and ignored")


class SlimeRewardResponse(BaseModel):
    reward: float = Field(description="the reward model's score; read by slime with `--reward-key reward`")


class ClassifyRequest(BaseModel):
    """vLLM's pooling classify request (``POST /classify``), for a reward model: ``input`` or ``messages``.

    Other fields vLLM defines (``user``, ``priority``, ``request_id``, ``add_special_tokens``, ...) are accepted and
    ignored, as vLLM ignores unknown ones; ``truncate_prompt_tokens`` is refused, since the service truncates as the
    model was trained (its manifest's max_length and side).
    """

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = Field(None, description="the served model's name; omitted means the served model")
    input: Text | Annotated[list[Text], Field(min_length=1)] | None = Field(
        None, description="one text or a list of texts, each scored as a whole ({'text'})"
    )
    messages: Annotated[list[Message], Field(min_length=1)] | None = Field(
        None, description="one conversation, rendered with the model's chat template"
    )
    use_activation: StrictBool | None = Field(
        None, description="true: sigmoid of the score (a probability); false or omitted: the raw score"
    )
    activation: StrictBool | None = Field(None, description="older vLLM spelling of use_activation")
    truncate_prompt_tokens: Any = Field(None, description="not supported: must be omitted or null")

    @model_validator(mode="after")
    def _one_shape(self) -> ClassifyRequest:
        if (self.input is None) == (self.messages is None):
            raise ValueError("a classify request needs exactly one of 'input' or 'messages'")
        if self.truncate_prompt_tokens is not None:
            raise ValueError(
                "'truncate_prompt_tokens' is not supported: texts are truncated as the model was trained "
                "(see /info formatting.max_length and truncation_side)"
            )
        return self

    @property
    def activated(self) -> bool:
        if self.use_activation is not None:
            return self.use_activation
        return bool(self.activation)


class ClassificationData(BaseModel):
    index: int
    label: str | None = Field(description="the name of the served logit (the model's reward label)")
    probs: list[float] = Field(description="one value: the raw score, or its sigmoid with use_activation")
    num_classes: int = Field(description="always 1: the service serves one logit")


class ClassifyUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int
    completion_tokens: int = 0
    prompt_tokens_details: None = None


class ClassificationResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: ClassifyUsage
