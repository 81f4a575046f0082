"""OpenAI Responses API bodies (pydantic): the /v1/responses request, its input items, and the
response objects it returns.

As in protocol.py every field is checked here, so a bad request is a 400 naming the field. Only
what this server can honour is accepted: text input, function tools, text / JSON output formats
(and vLLM's `structured_outputs`: regex, choice, grammar).
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Discriminator, Field, Tag, field_validator, model_validator

from quantserve.serve.protocol import Scheduling, Strict, StructuredOutputs

TOOL_NAME = r"^[A-Za-z0-9_.\-]+$"


def _text_or(items: Any, min_length: int = 0) -> Any:
    """A string or a list of `items`, told apart by type, so a bad list names its own field rather
    than failing as "should be a valid string". Tags are hyphenated: errors.py leaves them out of
    the field path it reports."""
    return Annotated[Union[Annotated[str, Tag("as-text"), Field(min_length=min_length)],
                           Annotated[list[items], Tag("as-list"), Field(min_length=min_length)]],
                     Discriminator(lambda v: "as-text" if isinstance(v, str) else "as-list")]


class TextPart(Strict):
    type: Literal["input_text", "output_text"]
    text: str


def joined(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(p.text for p in content)


class MessageItem(Strict):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: _text_or(TextPart)


class FunctionCallItem(Strict):
    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str

    @field_validator("arguments")
    @classmethod
    def _object(cls, v: str) -> str:
        try:
            ok = isinstance(json.loads(v), dict)
        except json.JSONDecodeError:
            ok = False
        if not ok:
            raise ValueError("arguments must be a JSON object")
        return v


class FunctionCallOutputItem(Strict):
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: _text_or(TextPart)


class ReasoningText(Strict):
    type: Literal["reasoning_text", "summary_text"]
    text: str


class ReasoningItem(Strict):
    """A reasoning item sent back by a client that keeps its own context; not replayed to the
    model (chat templates drop earlier turns' thinking)."""
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[ReasoningText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    status: str | None = None
    encrypted_content: str | None = None


ITEM_TAGS = {"message": "message-item", "function_call": "function-call-item",
             "function_call_output": "function-call-output-item", "reasoning": "reasoning-item"}


def _item_type(v: Any) -> str | None:
    """Messages may leave out `type` (OpenAI's "easy" input message)."""
    kind = v.get("type", "message") if isinstance(v, dict) else getattr(v, "type", None)
    return ITEM_TAGS.get(kind) if isinstance(kind, str) else None


InputItem = Annotated[Union[Annotated[MessageItem, Tag("message-item")],
                            Annotated[FunctionCallItem, Tag("function-call-item")],
                            Annotated[FunctionCallOutputItem, Tag("function-call-output-item")],
                            Annotated[ReasoningItem, Tag("reasoning-item")]],
                      Discriminator(_item_type, custom_error_type="invalid_item",
                                    custom_error_message="an input item is a message, a function_call, a "
                                                         "function_call_output or a reasoning item")]


class FunctionTool(Strict):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class NamedFunctionChoice(Strict):
    type: Literal["function"]
    name: str


class TextFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str = Field("response", min_length=1, max_length=64, pattern=TOOL_NAME)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a json_schema format needs a 'schema'")
        return self


class TextConfig(Strict):
    format: TextFormat = Field(default_factory=lambda: TextFormat(type="text"))


class ReasoningConfig(Strict):
    """For a thinking model: effort none / minimal switch the chat template's thinking off."""
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None
    generate_summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesRequest(Scheduling):
    model: str
    input: _text_or(InputItem, min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunctionChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    structured_outputs: StructuredOutputs | None = None       # vLLM's: regex, choice, grammar, json
    previous_response_id: str | None = None
    store: bool = True
    reasoning: ReasoningConfig | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)
    user: str | None = None

    @field_validator("metadata")
    @classmethod
    def _keys(cls, v):
        if any(len(k) > 64 for k in v or {}):
            raise ValueError("metadata keys must be at most 64 characters")
        return v

    @model_validator(mode="after")
    def _coherent(self) -> ResponsesRequest:
        if self.tool_choice not in (None, "none", "auto") and not self.tools:
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedFunctionChoice):
            if self.tool_choice.name not in {t.name for t in self.tools or []}:
                raise ValueError(f"tool_choice names {self.tool_choice.name!r}, which is not in tools")
        if self.tools and self.text and self.text.format.type != "text":
            raise ValueError("text.format and tools cannot be combined")
        return self


# ---- responses ------------------------------------------------------------------------------

class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class OutputReasoning(BaseModel):
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[dict[str, Any]]
    content: list[dict[str, Any]]
    status: Literal["in_progress", "completed", "incomplete"]


class OutputFunctionCall(BaseModel):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class InputTokensDetails(BaseModel):
    cached_tokens: int


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens"]


class ResponseObject(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: Literal["completed", "incomplete", "in_progress", "failed"]
    error: dict[str, Any] | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[Union[OutputReasoning, OutputMessage, OutputFunctionCall]]
    usage: ResponseUsage | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    parallel_tool_calls: bool
    text: dict[str, Any]
    store: bool
    metadata: dict[str, str]


class InputItemList(BaseModel):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class DeletedResponse(BaseModel):
    id: str
    object: Literal["response.deleted"] = "response.deleted"
    deleted: bool
