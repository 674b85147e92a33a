"""The OpenAI-compatible HTTP server over an `Engine` (FastAPI; run by `polar-serve` with uvicorn).

    app = build_app(engine, tokenizer, model_name="smollm2")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (plain JSON or server-sent events ending with
`data: [DONE]`), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus). Errors have OpenAI's body
`{"error": {"message", "type", "param", "code"}}`: 400 for a malformed request, a bad parameter or a prompt that with
`max_tokens` exceeds the engine's `max_len` (FastAPI's 422 validation errors included); 404 for an unknown model;
503 when the waiting queue is full or the engine is shut down. A client that disconnects cancels its requests (their
slots are freed); stop strings cancel the request as soon as they appear in the text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from polar_jax.serving import openai_api as api
from polar_jax.serving.engine import Engine
from polar_jax.serving.request import EngineClosedError, QueueFullError, RequestHandle
from polar_jax.serving.text import TextStream

_DISCONNECT_POLL_S = 0.05   # how often a plain (non-streaming) request checks that its client is still there


class _Disconnected(Exception):
  """The client closed the connection before the response."""


class _Unavailable(Exception):
  def __init__(self, message: str, code: str):
    super().__init__(message)
    self.code = code


def _finish_reason(handle: RequestHandle, text: TextStream) -> str:
  if text.stopped:
    return "stop"
  return {"stop": "stop", "length": "length"}.get(handle.finish_reason or "", "abort")


def _sse(obj: dict[str, Any]) -> str:
  return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Choice:
  """One prompt's request: its handle and text."""

  def __init__(self, handle: RequestHandle, text: TextStream):
    self.handle, self.text = handle, text

  async def deltas(self) -> AsyncIterator[str]:
    """The text as it is made; ends at the request's end or at a stop string (then the request is cancelled)."""
    async for tok in self.handle:
      piece = self.text.add([tok])
      if piece:
        yield piece
      if self.text.stopped:
        break
    self.handle.cancel()   # a stop string ended it (no-op when the engine did)
    tail = self.text.finish()
    if tail:
      yield tail

  async def collect(self) -> str:
    return "".join([d async for d in self.deltas()])

  @property
  def finish_reason(self) -> str:
    return _finish_reason(self.handle, self.text)

  @property
  def completion_tokens(self) -> int:
    return len(self.handle.token_ids)


def build_app(engine: Engine, tokenizer, *, model_name: str, shutdown_engine: bool = True) -> FastAPI:
  """The FastAPI app serving `engine` (which it shuts down on exit when `shutdown_engine`)."""

  @contextlib.asynccontextmanager
  async def lifespan(_app):
    yield
    if shutdown_engine:
      await asyncio.to_thread(engine.shutdown)

  app = FastAPI(title="polar-serve", lifespan=lifespan)
  app.state.engine = engine

  # ---- errors --------------------------------------------------------------------------------
  @app.exception_handler(RequestValidationError)
  async def _invalid(_request, exc: RequestValidationError):
    problems = []
    for e in exc.errors():
      loc = ".".join(str(p) for p in e.get("loc", ())[1:]) or "body"
      problems.append(f"{loc}: {e.get('msg', 'invalid')}")
    param = next((str(e["loc"][1]) for e in exc.errors() if len(e.get("loc", ())) > 1), None)
    return JSONResponse(api.error_body("; ".join(problems) or "malformed request", param=param), status_code=400)

  @app.exception_handler(api.BadRequest)
  async def _bad(_request, exc: api.BadRequest):
    return JSONResponse(api.error_body(str(exc), param=exc.param), status_code=400)

  @app.exception_handler(_Unavailable)
  async def _unavailable(_request, exc: _Unavailable):
    return JSONResponse(api.error_body(str(exc), type_="server_overloaded", code=exc.code), status_code=503)

  @app.exception_handler(StarletteHTTPException)
  async def _http(_request, exc: StarletteHTTPException):
    return JSONResponse(api.error_body(str(exc.detail), type_="invalid_request_error", code=exc.status_code),
                        status_code=exc.status_code)

  @app.exception_handler(Exception)
  async def _internal(_request, exc: Exception):   # a bug: say so in OpenAI's format rather than crash
    return JSONResponse(api.error_body(f"internal error: {type(exc).__name__}: {exc}", type_="internal_error"),
                        status_code=500)

  # ---- helpers -------------------------------------------------------------------------------
  def check_model(req) -> None:
    if req.model is not None and req.model != model_name:
      raise StarletteHTTPException(404, f"The model {req.model!r} does not exist (this server has {model_name!r})")

  def token_ids(prompt) -> list[int]:
    if isinstance(prompt, str):
      if not prompt:
        raise api.BadRequest("the prompt is empty", "prompt")
      return list(tokenizer.encode(prompt))
    return list(prompt)

  def submit_all(prompts: Sequence[list[int]], req, max_tokens: int | None) -> list[_Choice]:
    choices: list[_Choice] = []
    try:
      stop = req.stop_strings()
      for ids in prompts:
        if not ids:
          raise api.BadRequest("the prompt is empty", "prompt")
        params = req.sampling(max_tokens, len(ids), engine.max_len)
        try:
          handle = engine.submit(ids, params)
        except QueueFullError as e:
          raise _Unavailable(str(e), "queue_full") from e
        except EngineClosedError as e:
          raise _Unavailable(str(e), "shutting_down") from e
        except ValueError as e:
          raise api.BadRequest(str(e), "prompt") from e
        choices.append(_Choice(handle, TextStream(tokenizer, stop, handle.stop_ids)))
    except BaseException:
      for c in choices:
        c.handle.cancel()
      raise
    return choices

  async def until_done_or_gone(request: Request, choices: list[_Choice]) -> list[str]:
    """Every choice's text; cancels them all if the client disconnects first."""
    task = asyncio.ensure_future(asyncio.gather(*(c.collect() for c in choices)))
    try:
      while True:
        done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
        if done:
          return task.result()
        if await request.is_disconnected():
          raise _Disconnected()
    finally:
      if not task.done():
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())   # retrieved: no "never retrieved" log
      for c in choices:
        c.handle.cancel()

  def stream(choice: _Choice, chunk, include_usage: bool, first: dict | None) -> StreamingResponse:
    async def events():
      try:
        if first is not None:
          yield _sse(chunk(first, None))
        async for piece in choice.deltas():
          yield _sse(chunk(piece, None))
        yield _sse(chunk("", choice.finish_reason))
        if include_usage:
          yield _sse(chunk(None, None, usage=api.usage(len(choice.handle.prompt_ids), choice.completion_tokens)))
        yield "data: [DONE]\n\n"
      finally:   # the client went away (or the stream ended): free the slot
        choice.handle.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

  # ---- endpoints -----------------------------------------------------------------------------
  @app.post("/v1/completions")
  async def completions(req: api.CompletionRequest, request: Request):
    check_model(req)
    req.check_unsupported()
    raw = req.prompt
    if isinstance(raw, str) or (isinstance(raw, list) and raw and isinstance(raw[0], int)):
      prompts = [token_ids(raw)]
    elif isinstance(raw, list) and raw:
      prompts = [token_ids(p) for p in raw]
    else:
      raise api.BadRequest("the prompt is empty", "prompt")
    if req.stream and len(prompts) != 1:
      raise api.BadRequest("streaming takes one prompt per request", "prompt")
    choices = submit_all(prompts, req, req.max_tokens)
    rid, created = api.new_id("cmpl"), api.now()

    def chunk(text, reason, usage=None):
      body = {"id": rid, "object": "text_completion", "created": created, "model": model_name,
              "choices": [] if text is None else [{"index": 0, "text": text, "logprobs": None,
                                                   "finish_reason": reason}]}
      if usage is not None or req.include_usage:
        body["usage"] = usage
      return body

    if req.stream:
      return stream(choices[0], chunk, req.include_usage, None)
    try:
      texts = await until_done_or_gone(request, choices)
    except _Disconnected:
      return Response(status_code=499)   # nobody reads it: the client is gone
    return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
            "choices": [{"index": i, "text": t, "logprobs": None, "finish_reason": c.finish_reason}
                        for i, (c, t) in enumerate(zip(choices, texts))],
            "usage": api.usage(sum(len(p) for p in prompts), sum(c.completion_tokens for c in choices))}

  @app.post("/v1/chat/completions")
  async def chat(req: api.ChatRequest, request: Request):
    check_model(req)
    req.check_unsupported()
    if getattr(tokenizer, "chat_template", None) is None:
      raise api.BadRequest("the model's tokenizer has no chat template; use /v1/completions", "messages")
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
      ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # noqa: BLE001  (a template that rejects these messages)
      raise api.BadRequest(f"the chat template rejected the messages: {e}", "messages") from e
    choices = submit_all([list(ids)], req, req.token_limit)
    rid, created = api.new_id("chatcmpl"), api.now()

    def chunk(delta, reason, usage=None):
      if isinstance(delta, str):
        delta = {"content": delta} if delta or reason is None else {}
      body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
              "choices": [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                                    "finish_reason": reason}]}
      if usage is not None or req.include_usage:
        body["usage"] = usage
      return body

    if req.stream:
      return stream(choices[0], chunk, req.include_usage, {"role": "assistant", "content": ""})
    try:
      [text] = await until_done_or_gone(request, choices)
    except _Disconnected:
      return Response(status_code=499)   # nobody reads it: the client is gone
    c = choices[0]
    return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": c.finish_reason}],
            "usage": api.usage(len(ids), c.completion_tokens)}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": model_name, "object": "model", "created": api.now(),
                                        "owned_by": "polar_jax", "max_model_len": engine.max_len}]}

  @app.get("/health")
  async def health():
    if not engine.alive:
      return JSONResponse(api.error_body("the engine is not running", type_="server_error"), status_code=503)
    return {"status": "ok", **engine.stats()}

  @app.get("/metrics")
  async def metrics():
    from prometheus_client import CONTENT_TYPE_LATEST
    return Response(engine.metrics.text(), media_type=CONTENT_TYPE_LATEST)

  return app
