"""Request and response bodies. Validation lives here, so a 422 names the field that is wrong."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictStr,
    Tag,
    model_validator,
)


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


class TextPart(BaseModel):
    """One part of an OpenAI-style message content list (``{"type": "text", "text": ...}``). A reward model reads
    text only, so other part types (``image_url``, ``input_audio``, ...) are refused by name."""

    model_config = ConfigDict(extra="ignore")

    type: StrictStr
    text: Text | None = None

    @model_validator(mode="after")
    def _text_only(self) -> TextPart:
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported: the reward model reads text only")
        if self.text is None:
            raise ValueError("a 'text' content part needs a 'text' field")
        return self


def _join_parts(parts: list[TextPart]) -> str:
    """The parts' texts joined with newlines, as vLLM renders a content list for a text-only chat template."""
    return "\n".join(part.text or "" for part in parts)


def _content_kind(value: Any) -> str:
    return "parts" if isinstance(value, list) else "string"


# A message's content: a string, or OpenAI-style text parts, joined into one string at validation. The tags name
# the form in a 422's loc (``content.parts.0``), and only the form given is reported.
Content = Annotated[
    Annotated[Text, Tag("string")]
    | Annotated[list[TextPart], Field(min_length=1), AfterValidator(_join_parts), Tag("parts")],
    Discriminator(_content_kind),
]


class Message(BaseModel):
    """One chat message; other keys (``name``, ...) are accepted and ignored. ``content`` is a string or a list of
    text parts (OpenAI's format), which validation joins into one string."""

    model_config = ConfigDict(extra="ignore")

    role: Text
    content: Content


def plain_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """The plain ``{"role", "content"}`` dicts the formatting contract takes (other keys dropped)."""
    return [{"role": m.role, "content": m.content} for m in messages]


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
            return {"messages": plain_messages(self.messages)}
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
    components: dict[str, list[float]] | None = Field(
        None, description="several models served combined: each one's raw scores, by name (absent for one model)"
    )


Side = Text | list[Message]


class PreferencePair(BaseModel):
    """A preference pair in TRL's shape: ``chosen`` and ``rejected`` (texts or messages), optional ``prompt``."""

    model_config = ConfigDict(extra="forbid")

    prompt: Text | list[Message] | None = None
    chosen: Side
    rejected: Side

    def as_row(self) -> dict[str, Any]:
        def plain(value: Any) -> Any:
            return plain_messages(value) if isinstance(value, list) else value

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
    components: dict[str, list[float]] | None = Field(
        None, description="several models served combined: each one's margins, by name (absent for one model)"
    )


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
        description="per-sample values for the trainer's logs: truncated (1.0 if cut to max_length); with several "
        "models served combined, each one's raw score under its name",
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
    components: list[dict[str, Any]] | None = Field(
        None, description="several models served combined: each one's name, model, version, recipe, batching"
    )
    combine: dict[str, Any] | None = Field(
        None, description="several models served combined: the expression, its weights and constant, raw or normalized"
    )


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
        None,
        description="one conversation, rendered with the model's chat template; a content may be a string or "
        "OpenAI-style text parts",
    )
    use_activation: StrictBool | None = Field(
        None,
        description="true or omitted: the sigmoid of the score (vLLM's classify activation for a one-logit model, "
        "and its default); false: the raw score",
    )
    activation: StrictBool | None = Field(None, description="deprecated vLLM spelling of use_activation")
    softmax: StrictBool | None = Field(None, description="deprecated vLLM spelling of use_activation")
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
        """Whether to answer the sigmoid of the score: the first of ``softmax``, ``activation``, ``use_activation``
        that is set (vLLM reads its deprecated spellings first), else vLLM's default, the activation."""
        for flag in (self.softmax, self.activation, self.use_activation):
            if flag is not None:
                return flag
        return True


class ClassificationData(BaseModel):
    index: int
    label: str | None = Field(description="the name of the served logit (the model's reward label)")
    probs: list[float] = Field(
        description="one value: the sigmoid of the score, or the raw score with use_activation false"
    )
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


class ModelPermission(BaseModel):
    """vLLM's (and OpenAI's former) model permission object, as vLLM lists it."""

    id: str = Field(default_factory=lambda: f"modelperm-{uuid.uuid4().hex}")
    object: str = "model_permission"
    created: int = Field(default_factory=lambda: int(time.time()))
    allow_create_engine: bool = False
    allow_sampling: bool = True
    allow_logprobs: bool = True
    allow_search_indices: bool = False
    allow_view: bool = True
    allow_fine_tuning: bool = False
    organization: str = "*"
    group: str | None = None
    is_blocking: bool = False


class ModelCard(BaseModel):
    """One served model in ``GET /v1/models``, in vLLM's shape (OpenAI's model object plus vLLM's fields)."""

    id: str = Field(description="the served model's name: what a request's 'model' field names")
    object: str = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "reward-service"
    root: str | None = Field(None, description="the checkpoint folder it was loaded from")
    parent: str | None = None
    max_model_len: int | None = Field(None, description="the model's max_length: longer texts are truncated")
    permission: list[ModelPermission] = Field(default_factory=lambda: [ModelPermission()])


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]
