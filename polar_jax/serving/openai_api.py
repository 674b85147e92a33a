"""OpenAI request schemas (pydantic) and response / error bodies for the server.

Supported: `/v1/completions` (prompt as text, token ids, or a list of either) and `/v1/chat/completions`, with
`max_tokens` (chat: also `max_completion_tokens`), `temperature` (default 1), `top_p`, `top_k` (an extension, as in
vLLM: -1 / 0 = off), `seed`, `stop`, `stop_token_ids` and `ignore_eos` (vLLM extensions), `stream` and
`stream_options.include_usage`. A missing `max_tokens` means "up to the engine's max_len" (as vLLM).
Unsupported options that would change the output (`n` > 1, `echo`, `logprobs`, penalties, `best_of`) are refused
with a 400 naming them, not ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from polar_jax.serving.params import SamplingParams


class BadRequest(ValueError):
  """A request the server refuses with 400 (`param`: the offending field)."""

  def __init__(self, message: str, param: str | None = None):
    super().__init__(message)
    self.param = param


class StreamOptions(BaseModel):
  model_config = ConfigDict(extra="ignore")
  include_usage: bool = False


class _Common(BaseModel):
  model_config = ConfigDict(extra="ignore")
  model: str | None = None
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None
  seed: int | None = None
  stop: Union[str, list[str], None] = None
  stream: bool = False
  stream_options: StreamOptions | None = None
  n: int = 1
  logprobs: Any = None
  presence_penalty: float | None = None
  frequency_penalty: float | None = None
  logit_bias: dict[str, float] | None = None
  stop_token_ids: list[int] | None = None
  ignore_eos: bool = False
  user: str | None = None

  def check_unsupported(self) -> None:
    if self.n != 1:
      raise BadRequest(f"n={self.n} is not supported (one choice per prompt)", "n")
    if self.logprobs not in (None, False, 0):
      raise BadRequest("logprobs are not supported", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
      if getattr(self, name) not in (None, 0, 0.0):
        raise BadRequest(f"{name} is not supported", name)
    if self.logit_bias:
      raise BadRequest("logit_bias is not supported", "logit_bias")

  def stop_strings(self) -> list[str]:
    stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
    if len(stop) > 16:
      raise BadRequest(f"at most 16 stop strings, got {len(stop)}", "stop")
    return [s for s in stop if s]

  def sampling(self, max_tokens: int | None, prompt_len: int, max_len: int) -> SamplingParams:
    """The engine's `SamplingParams`; BadRequest naming a bad value."""
    if max_tokens is None:
      max_tokens = max_len - prompt_len
      if max_tokens < 1:
        raise BadRequest(f"the prompt ({prompt_len} tokens) leaves no room to generate within max_len ({max_len})",
                         "prompt")
    elif max_tokens < 1:
      raise BadRequest(f"max_tokens must be >= 1, got {max_tokens}", "max_tokens")
    if prompt_len + max_tokens > max_len:
      raise BadRequest(f"the prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the server's max_len "
                       f"({max_len})", "max_tokens")
    top_k = None if self.top_k in (None, 0, -1) else self.top_k
    temperature = 1.0 if self.temperature is None else self.temperature
    top_p = 1.0 if self.top_p is None else self.top_p
    try:
      return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=self.seed,
                            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos)
    except ValueError as e:
      param = next((f for f in ("temperature", "top_p", "top_k", "seed", "stop_token_ids") if f in str(e)), None)
      raise BadRequest(str(e), param) from e

  @property
  def include_usage(self) -> bool:
    return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(_Common):
  prompt: Union[str, list[str], list[int], list[list[int]]]
  max_tokens: int | None = None
  echo: bool = False
  best_of: int | None = None
  suffix: str | None = None

  def check_unsupported(self) -> None:
    super().check_unsupported()
    if self.echo:
      raise BadRequest("echo is not supported", "echo")
    if self.best_of not in (None, 1):
      raise BadRequest("best_of is not supported", "best_of")
    if self.suffix:
      raise BadRequest("suffix is not supported", "suffix")


class ChatMessage(BaseModel):
  model_config = ConfigDict(extra="allow")
  role: str
  content: Union[str, list[dict[str, Any]], None] = None

  def text(self) -> str:
    if self.content is None or isinstance(self.content, str):
      return self.content or ""
    parts = []
    for part in self.content:
      if part.get("type") != "text":
        raise BadRequest(f"message content of type {part.get('type')!r} is not supported (text only)", "messages")
      parts.append(str(part.get("text", "")))
    return "".join(parts)


class ChatRequest(_Common):
  messages: list[ChatMessage] = Field(min_length=1)
  max_tokens: int | None = None
  max_completion_tokens: int | None = None

  @property
  def token_limit(self) -> int | None:
    return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses -------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
  return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
  return int(time.time())


def usage(prompt: int, completion: int) -> dict[str, int]:
  return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | int | None = None) -> dict[str, Any]:
  return {"error": {"message": message, "type": type_, "param": param, "code": code}}


FinishReason = Literal["stop", "length", "abort"]
