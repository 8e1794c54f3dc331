"""OpenAI's chat and completions requests, and how each maps onto a job's fields (the wire
contract's `JobMessage`: messages or prompt, `params`, model, priority, ttl_s). There is no
other representation of a request: `job_fields` gives what `AsyncInferqClient.submit` takes,
and the wire schema validates it (its refusals become 400s naming the field).

What cannot be honoured is refused, not ignored: a parameter OpenAI defines that changes the
output (penalties, tools, logprobs, JSON mode...) is accepted only at its neutral value;
parameters that change nothing here (`user`, `metadata`, `store`...) are accepted; an unknown
one is refused as OpenAI refuses it. The list is docs/gateway.md's."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from gateway.errors import invalid

OPENAI_TEMPERATURE = 1.0  # OpenAI's defaults when a request leaves them out
OPENAI_COMPLETION_MAX_TOKENS = 16
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# Parameters accepted whatever their value (they change nothing a job does).
ACCEPTED = {
    "store",
    "service_tier",
    "parallel_tool_calls",
    "prompt_cache_key",
    "prompt_cache_retention",
    "safety_identifier",
}
# Parameters accepted only at their neutral value (anything else would be silently wrong).
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Request(BaseModel):
    """What chat and completions requests share; unknown fields are checked by `extras`."""

    model_config = ConfigDict(extra="allow")
    # max_tokens when a request gives none; None: the gateway's (the workers' max_new_tokens)
    DEFAULT_MAX_TOKENS: ClassVar[int | None] = None

    model: StrictStr
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(None, max_length=512)
    metadata: dict[StrictStr, StrictStr] | None = Field(None, max_length=16)
    # inferq extensions (the OpenAI SDKs send them with `extra_body`)
    priority: int = 0
    ttl_s: float | None = None

    def checked(self) -> None:
        """Refuse what cannot be honoured (400, naming the parameter)."""
        if self.n not in (None, 1):
            raise invalid("n: only 1 choice per request is supported", param="n")
        for name, value in (self.model_extra or {}).items():
            if name in ACCEPTED:
                continue
            if name not in NEUTRAL:
                raise invalid(f"Unrecognized request argument supplied: {name}", param=name)
            if value not in NEUTRAL[name]:
                raise invalid(
                    f"{name}: not supported (only its default)",
                    param=name,
                    code="unsupported_parameter",
                )

    def params(self, max_tokens: int | None) -> dict[str, Any]:
        """The job's `params` (SamplingParams validates them)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        out: dict[str, Any] = {
            "max_tokens": max_tokens,
            "temperature": OPENAI_TEMPERATURE if self.temperature is None else self.temperature,
            "top_p": 1.0 if self.top_p is None else self.top_p,
            "stop": stop,
        }
        if self.seed is not None:
            out["seed"] = self.seed
        return out

    def common(self, max_tokens: int | None, default_max_tokens: int) -> dict[str, Any]:
        if max_tokens is None:
            max_tokens = self.DEFAULT_MAX_TOKENS or default_max_tokens
        return {
            "model": self.model,
            "params": self.params(max_tokens),
            "priority": self.priority,
            "ttl_s": self.ttl_s,
        }

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: StrictStr
    content: StrictStr | list[TextPart] | None
    name: StrictStr | None = None  # accepted; the chat template has no names

    def job_message(self, index: int) -> dict[str, str]:
        role = ROLES.get(self.role)
        if role is None:
            raise invalid(
                f"messages[{index}].role: {self.role!r} is not supported (system, "
                "developer, user, assistant)",
                param=f"messages.{index}.role",
            )
        if self.content is None:
            raise invalid(
                f"messages[{index}].content is required", param=f"messages.{index}.content"
            )
        content = (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content)
        )
        return {"role": role, "content": content}


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def job_fields(self, default_max_tokens: int) -> dict[str, Any]:
        """What `AsyncInferqClient.submit` takes for this request."""
        self.checked()
        chosen = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else (self.max_tokens)
        )
        messages = [m.job_message(i) for i, m in enumerate(self.messages)]
        return {"messages": messages, **self.common(chosen, default_max_tokens)}


class CompletionRequest(_Request):
    DEFAULT_MAX_TOKENS: ClassVar[int | None] = OPENAI_COMPLETION_MAX_TOKENS

    prompt: StrictStr | list[StrictStr]

    def job_fields(self, default_max_tokens: int) -> dict[str, Any]:
        self.checked()
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise invalid("prompt: one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        return {"prompt": prompt, **self.common(self.max_tokens, default_max_tokens)}
