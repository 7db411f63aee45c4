"""Request bodies of the OpenAI API that llmos serves, validated by pydantic.

Every field is either honoured or refused: a field OpenAI defines that llmos
does not implement is a 400 naming it (`unsupported`), never silently
dropped. Fields nobody defines (vendor extras such as `user` or `metadata`)
pass through unread.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPTS = 2048  # OpenAI's cap on a completions prompt list

# OpenAI fields llmos does not implement: refused when set to anything but their default.
_UNSUPPORTED: dict[str, Any] = {
    "suffix": None, "functions": None, "function_call": None, "audio": None, "prediction": None,
    "web_search_options": None, "modalities": ["text"], "reasoning_effort": None,
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # read by `unsupported`; harmless extras are ignored

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    best_of: int | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

    def unsupported(self) -> str | None:
        """The first field that is set but that llmos does not implement, if any."""
        extra = self.model_extra or {}
        for name, default in _UNSUPPORTED.items():
            if name in extra and extra[name] not in (default, None):
                return name
        if self.best_of not in (None, self.n):
            return "best_of"
        return None


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False


class FunctionDefinition(BaseModel):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"] = "function"
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(_Request):
    messages: list[Any]  # each checked by server.messages, which names the bad one
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    def tool_dicts(self) -> list[dict[str, Any]] | None:
        """The tools as plain JSON, the shape chat templates expect."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None


class EmbeddingRequest(BaseModel):
    model: str | None = None
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class TokenizeRequest(BaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[Any] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model: str | None = None
    tokens: list[int]
