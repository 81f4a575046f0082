"""Anthropic Messages API bodies (pydantic), and their translation into the OpenAI chat request that
the rest of the server plans and runs: the chat template, tools (prompted or forced by a grammar),
stop strings and sampling are the chat route's own.

Every field is checked here, so a bad request is a 400 naming the field (in Anthropic's error
shape, see errors.py) before anything is planned.
"""
from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from quantserve.serve.protocol import (ChatCompletionRequest, ChatMessage, FunctionCall, FunctionDef, NamedFunction,
                                       NamedToolChoice, Scheduling, Strict, Tool, ToolCall)

TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class TextBlock(Strict):
    type: Literal["text"]
    text: str


class ContentBlock(Strict):
    """A block of a message: which fields it needs depends on its type (one class rather than a
    tagged union, so a bad block's error names the block's own field)."""

    type: Literal["text", "tool_use", "tool_result", "thinking", "redacted_thinking"]
    text: str | None = None                                   # text
    thinking: str | None = None                               # thinking: an earlier reply's, not replayed
    signature: str | None = None
    data: str | None = None                                   # redacted_thinking
    id: str | None = Field(None, min_length=1)                # tool_use: the call
    name: str | None = Field(None, pattern=TOOL_NAME)
    input: dict[str, Any] | None = None
    tool_use_id: str | None = Field(None, min_length=1)       # tool_result: the call it answers
    content: str | list[TextBlock] = ""
    is_error: bool = False                                    # tool_result: the call failed

    @model_validator(mode="after")
    def _fields_of_its_type(self) -> ContentBlock:
        needs = {"text": ("text",), "tool_use": ("id", "name", "input"), "tool_result": ("tool_use_id",),
                 "thinking": ("thinking",), "redacted_thinking": ("data",)}[self.type]
        missing = [f for f in needs if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.type} block needs '{missing[0]}'")
        return self

    def result_text(self) -> str:
        """A tool result for the chat template, which has no field for failure: said in the text."""
        text = self.content if isinstance(self.content, str) else "".join(b.text for b in self.content)
        return f"Error: {text}" if self.is_error else text


class InputMessage(Strict):
    role: Literal["user", "assistant"]
    content: str | Annotated[list[ContentBlock], Field(min_length=1)]

    @model_validator(mode="after")
    def _blocks_fit_the_role(self) -> InputMessage:
        kinds = {b.type for b in self.content} if isinstance(self.content, list) else set()
        if self.role == "user" and "tool_use" in kinds:
            raise ValueError("tool_use blocks belong in assistant messages")
        if self.role == "assistant" and "tool_result" in kinds:
            raise ValueError("tool_result blocks belong in user messages")
        if self.role == "user" and kinds & {"thinking", "redacted_thinking"}:
            raise ValueError("thinking blocks belong in assistant messages")
        return self

    def texts(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(b.text for b in self.content if b.type == "text")

    def chat_messages(self) -> list[ChatMessage]:
        """As OpenAI messages: tool_use blocks are tool calls, each tool_result a tool message."""
        if isinstance(self.content, str):
            return [ChatMessage(role=self.role, content=self.content)]
        if self.role == "assistant":
            calls = [ToolCall(id=b.id, function=FunctionCall(name=b.name, arguments=json.dumps(b.input)))
                     for b in self.content if b.type == "tool_use"]
            return [ChatMessage(role="assistant", content=self.texts() or (None if calls else ""),
                                tool_calls=calls or None)]
        results = [ChatMessage(role="tool", tool_call_id=b.tool_use_id, content=b.result_text())
                   for b in self.content if b.type == "tool_result"]
        texts = [b for b in self.content if b.type == "text"]
        return results + ([ChatMessage(role="user", content=self.texts())] if texts else [])


class AnthropicTool(Strict):
    type: Literal["custom"] | None = None      # server tools (web search, bash ...) are not served here
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    input_schema: dict[str, Any]

    @field_validator("input_schema")
    @classmethod
    def _object_schema(cls, v):
        if v.get("type") != "object":
            raise ValueError("input_schema must be a JSON schema with type 'object'")
        return v


class ToolChoice(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None                    # type "tool": the tool to call
    disable_parallel_tool_use: bool = False

    def openai(self) -> str | NamedToolChoice:
        if self.type == "tool":
            return NamedToolChoice(function=NamedFunction(name=self.name))
        return {"any": "required"}.get(self.type, self.type)


class Metadata(Strict):
    user_id: str | None = Field(None, max_length=256)


class ThinkingConfig(Strict):
    """Extended thinking: for a thinking model, the chat template's enable_thinking switch."""
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = Field(None, ge=1)


class MessagesInput(Strict):
    """What count_tokens and messages share: the conversation and its tools."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None

    @model_validator(mode="after")
    def _tools_coherent(self) -> MessagesInput:
        names = [t.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise ValueError("tools: tool names must be unique")
        choice = self.tool_choice
        if choice is not None and choice.type in ("any", "tool") and not names:
            raise ValueError(f"tool_choice: type '{choice.type}' needs tools")
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise ValueError(f"tool_choice.name: {choice.name!r} is not one of the tools")
        return self

    def chat_request(self, **fields) -> ChatCompletionRequest:
        """The OpenAI chat request that asks the same; an assistant message last is continued."""
        system = self.system if isinstance(self.system, str) else "".join(b.text for b in self.system or [])
        messages = [ChatMessage(role="system", content=system)] if system else []
        messages += [m for message in self.messages for m in message.chat_messages()]
        last = self.messages[-1]
        prefilled = last.role == "assistant" and last.texts().strip() != "" and messages[-1].tool_calls is None
        tools = [Tool(function=FunctionDef(name=t.name, description=t.description, parameters=t.input_schema))
                 for t in self.tools or []]
        choice = self.tool_choice
        return ChatCompletionRequest(
            model=self.model, messages=messages, tools=tools or None, tool_choice=choice and choice.openai(),
            parallel_tool_calls=not (choice and choice.disable_parallel_tool_use),
            continue_final_message=prefilled, **fields,
            chat_template_kwargs={"enable_thinking": self.thinking.type != "disabled"} if self.thinking else None)


class MessagesRequest(MessagesInput, Scheduling):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stream: bool = False
    metadata: Metadata | None = None

    @field_validator("stop_sequences")
    @classmethod
    def _stops(cls, v):
        if v is not None and any(not s for s in v):
            raise ValueError("stop sequences must not be empty")
        return v

    def chat(self) -> ChatCompletionRequest:
        return self.chat_request(max_tokens=self.max_tokens, stop=self.stop_sequences, temperature=self.temperature,
                                 top_p=self.top_p, top_k=self.top_k, stream=self.stream,
                                 user=self.metadata and self.metadata.user_id, priority=self.priority,
                                 timeout=self.timeout)


class CountTokensRequest(MessagesInput):
    pass


# ---- responses ------------------------------------------------------------------------------

class TextOut(BaseModel):
    type: Literal["text"] = "text"
    text: str


class ToolUseOut(BaseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


class MessageUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int = 0


class MessageResponse(BaseModel):
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[Annotated[TextOut | ToolUseOut, Field(discriminator="type")]]
    stop_reason: Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"] | None
    stop_sequence: str | None = None
    usage: MessageUsage


class TokenCount(BaseModel):
    input_tokens: int


class AnthropicErrorInfo(BaseModel):
    type: str
    message: str


class AnthropicErrorResponse(BaseModel):
    type: Literal["error"] = "error"
    error: AnthropicErrorInfo
