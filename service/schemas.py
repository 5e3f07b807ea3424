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

    query: list[Text] = Field(min_length=1, description="prompt + response, already concatenated")
    prompts: list[Any] | None = Field(None, description="accepted and ignored")
    labels: list[Any] | None = Field(None, description="accepted and ignored")


class GetRewardResponse(BaseModel):
    rewards: list[float]
    scores: list[float]
    extra_logs: dict[str, Any] = Field(default_factory=dict)


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
