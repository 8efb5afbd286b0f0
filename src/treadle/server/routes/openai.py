"""OpenAI-compatible inference under ``/oai/api/v1`` (Tinker's path): ``chat/completions``,
``completions`` and ``models``, for the official ``openai`` client and anything else that
speaks OpenAI's API (``base_url=f"{TINKER_BASE_URL}/oai/api/v1"``, the treadle key as the
API key, which arrives as ``Authorization: Bearer``).

This module is the wire: request bodies checked at the edge (a field treadle does not
implement is a 400 naming it, never silently ignored), answers and errors in OpenAI's
shapes, server-sent events for ``stream``. What a request means is
:mod:`treadle.service.openai_compat`'s business.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Sequence
from typing import Annotated, Any, ClassVar, Literal

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError
from sse_starlette import EventSourceResponse

from treadle.errors import NotFound, StorageFull, UserInputError, message_of
from treadle.server.deps import ServiceDep, UserDep
from treadle.service.openai_compat import (
    Choice,
    Completion,
    Delta,
    OpenAICompat,
    Options,
)

PREFIX = "/oai/api/v1"


class _OpenAIRoute(APIRoute):
    """Every failure of these routes, the app-wide key check's 401 included, answers in
    OpenAI's error shape (``{"error": {message, type, param, code}}``), which the openai
    client reads."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def answer_errors(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _validation_error(exc)
            except HTTPException as exc:
                kind = "authentication_error" if exc.status_code == 401 else "invalid_request_error"
                return _error(exc.status_code, str(exc.detail), kind)
            except NotFound as exc:
                return _error(404, message_of(exc), code="model_not_found")
            except (UserInputError, UnicodeDecodeError) as exc:
                return _error(400, message_of(exc))
            except StorageFull as exc:
                return _error(507, str(exc), "server_error")

        return answer_errors


router = APIRouter(prefix=PREFIX, route_class=_OpenAIRoute)


def _error(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """The first thing wrong with a body, as a 400 naming the field."""
    errors = exc.errors()
    error = errors[0]
    param = _param(error.get("loc", ()))
    kind = error.get("type")
    if kind == "json_invalid":
        return _error(400, f"the body is not valid JSON: {error.get('msg')}")
    if kind == "unsupported":
        param = error.get("ctx", {}).get("param", param)
        return _error(400, str(error.get("msg")), param=param, code="unsupported_parameter")
    if kind == "extra_forbidden":
        message = f"unsupported field {param!r}: treadle's OpenAI-compatible API does not take it"
        return _error(400, message, param=param, code="unsupported_parameter")
    if kind == "missing":
        return _error(400, f"{param} is required", param=param)
    if param is None:
        return _error(400, f"the body must be a JSON object: {error.get('msg')}")
    # A value of none of a union's types fails once per type: name them all.
    wanted = dict.fromkeys(str(e.get("msg")) for e in errors if _param(e.get("loc", ())) == param)
    return _error(400, f"{param}: {'; or '.join(wanted)}", param=param)


def _param(loc: Sequence[int | str]) -> str | None:
    """The field a pydantic error location points at, as ``messages.0.content``: without
    the leading ``body`` and the names of union members (``str``, ``list[int]``)."""
    parts = [str(p) for p in loc]
    if parts[:1] == ["body"]:
        parts = parts[1:]
    parts = [p for p in parts if "[" not in p and p not in _TYPE_TAGS]
    return ".".join(parts) or None


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


# -- request bodies -------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class _Body(_Strict):
    # OpenAI fields treadle does not implement: a 400 naming the field, unless absent,
    # null, empty or at their default (clients that always send defaults keep working).
    unsupported: ClassVar[dict[str, Any]] = {}  # field -> its harmless default

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, harmless in cls.unsupported.items():
            if name not in data:
                continue
            value = data[name]
            if value not in (None, [], {}, harmless):
                raise PydanticCustomError(
                    "unsupported",
                    "{param} is not supported by treadle's OpenAI-compatible API; leave it out",
                    {"param": name},
                )
        return {k: v for k, v in data.items() if k not in cls.unsupported}


class StreamOptions(_Strict):
    include_usage: bool | None = False


_UNSUPPORTED_CHAT = {
    "tools": None,
    "tool_choice": "none",
    "functions": None,
    "function_call": "none",
    "parallel_tool_calls": None,
    "response_format": {"type": "text"},
    "logit_bias": None,
    "audio": None,
    "modalities": ["text"],
    "prediction": None,
    "reasoning_effort": None,
    "web_search_options": None,
    "service_tier": "auto",
    "store": False,
    "metadata": None,
}
_UNSUPPORTED_COMPLETIONS = {"logit_bias": None, "suffix": None, "echo": False, "best_of": 1}


class _Sampling(_Body):
    """What both endpoints share. ``top_k``, ``min_p``, ``repetition_penalty`` and
    ``ignore_eos`` are extensions (vLLM's names; the openai client sends them in
    ``extra_body``)."""

    model: str
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # OpenAI's end-user id: accepted, not used
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = False

    def options(self, max_tokens: int | None, logprobs: bool, top_logprobs: int) -> Options:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Options(
            max_tokens=max_tokens,
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=stop,
            ignore_eos=bool(self.ignore_eos),
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else ""
        if isinstance(self.content, list):
            content = "".join(part.text for part in self.content)
        # "developer" is OpenAI's newer name for the system message; templates know "system".
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_Sampling):
    unsupported = _UNSUPPORTED_CHAT
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequestBody(_Sampling):
    unsupported = _UNSUPPORTED_COMPLETIONS
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = Field(None, ge=0, le=5)


def _compat(request: Request) -> OpenAICompat:
    """The app's one :class:`OpenAICompat` (it keeps recently used adapters loaded)."""
    state = request.app.state
    if getattr(state, "openai", None) is None:
        service = state.service
        state.openai = OpenAICompat(
            service.sampling,
            service.futures,
            service.settings.max_num_samples,
            service.settings.oai_cached_checkpoints,
        )
    compat: OpenAICompat = state.openai
    return compat


CompatDep = Annotated[OpenAICompat, Depends(_compat)]


# -- routes ---------------------------------------------------------------------------


@router.get("/models")
async def list_models(service: ServiceDep) -> dict[str, Any]:
    """The served base models (checkpoint paths are valid ``model`` values too)."""
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "treadle"}
        for name in service.models
    ]
    return {"object": "list", "data": data}


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: ChatCompletionRequest, compat: CompatDep, user: UserDep
) -> dict[str, Any] | EventSourceResponse:
    if body.top_logprobs and not body.logprobs:
        raise UserInputError("top_logprobs needs logprobs: true")
    max_tokens = body.max_completion_tokens or body.max_tokens
    options = body.options(max_tokens, bool(body.logprobs), body.top_logprobs or 0)
    target = compat.target(user, body.model)
    prompt = await compat.chat_prompt(target, [m.for_template() for m in body.messages])
    request = compat.check(target, [prompt], options, bool(body.stream))
    answer = _Answer("chatcmpl", "chat.completion", body.model)
    if body.stream:
        return _stream(compat.stream(user, request), answer, True, body.include_usage)
    return answer.chat(await compat.complete(user, request))


@router.post("/completions", response_model=None)
async def completions(
    body: CompletionRequestBody, compat: CompatDep, user: UserDep
) -> dict[str, Any] | EventSourceResponse:
    prompt = body.prompt
    # One prompt (text or token ids) or a list of them.
    prompts = [prompt] if isinstance(prompt, str) or _ids(prompt) else list(prompt)
    options = body.options(body.max_tokens, body.logprobs is not None, body.logprobs or 0)
    target = compat.target(user, body.model)
    compat.check_count(len(prompts), options.n)  # before tokenizing them all
    tokens = await compat.text_prompts(target, prompts)  # type: ignore[arg-type]
    request = compat.check(target, tokens, options, bool(body.stream))
    answer = _Answer("cmpl", "text_completion", body.model)
    if body.stream:
        return _stream(compat.stream(user, request), answer, False, body.include_usage)
    return answer.text(await compat.complete(user, request))


def _ids(prompt: Any) -> bool:
    return bool(prompt) and all(isinstance(p, int) for p in prompt)


# -- answers --------------------------------------------------------------------------


class _Answer:
    """OpenAI's answer shapes for one request."""

    def __init__(self, id_prefix: str, kind: str, model: str) -> None:
        self.id = f"{id_prefix}-{secrets.token_hex(12)}"
        self.kind = kind
        self.model = model
        self.created = int(time.time())

    def _head(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def chat(self, completion: Completion) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": _chat_logprobs(c, 0, None),
                "finish_reason": c.finish_reason,
            }
            for c in completion.choices
        ]
        return {**self._head(self.kind), "choices": choices, "usage": _usage(completion)}

    def text(self, completion: Completion) -> dict[str, Any]:
        choices = [
            {
                "index": c.index,
                "text": c.text,
                "logprobs": _text_logprobs(c, 0, None, 0),
                "finish_reason": c.finish_reason,
            }
            for c in completion.choices
        ]
        return {**self._head(self.kind), "choices": choices, "usage": _usage(completion)}

    def chat_chunks(self, completion: Completion | None) -> list[dict[str, Any]]:
        """The opening chunk (no completion yet), else the completion's chunks."""
        head = self._head("chat.completion.chunk")
        if completion is None:
            role = {"index": 0, "delta": {"role": "assistant", "content": ""}}
            return [{**head, "choices": [dict(role, logprobs=None, finish_reason=None)]}]
        chunks = []
        for c in completion.choices:
            for t, piece in enumerate(c.pieces or []):
                logprobs = _chat_logprobs(c, t, t + 1)
                if piece or logprobs:
                    delta = {"index": c.index, "delta": {"content": piece}, "logprobs": logprobs}
                    chunks.append({**head, "choices": [dict(delta, finish_reason=None)]})
            end = {"index": c.index, "delta": {}, "logprobs": None}
            chunks.append({**head, "choices": [dict(end, finish_reason=c.finish_reason)]})
        return chunks

    def text_chunks(self, completion: Completion | None) -> list[dict[str, Any]]:
        head = self._head("text_completion")
        if completion is None:
            return []
        chunks = []
        for c in completion.choices:
            offset = 0
            for t, piece in enumerate(c.pieces or []):
                logprobs = _text_logprobs(c, t, t + 1, offset)
                offset += len(piece)
                if piece or logprobs:
                    choice = {"index": c.index, "text": piece, "logprobs": logprobs}
                    chunks.append({**head, "choices": [dict(choice, finish_reason=None)]})
            end = {"index": c.index, "text": "", "logprobs": None}
            chunks.append({**head, "choices": [dict(end, finish_reason=c.finish_reason)]})
        return chunks

    def delta_chunk(self, delta: Delta, chat: bool) -> dict[str, Any]:
        """Text of one choice decoded while it samples."""
        if chat:
            choice = {"index": delta.index, "delta": {"content": delta.text}}
            head = self._head("chat.completion.chunk")
        else:
            choice = {"index": delta.index, "text": delta.text}
            head = self._head("text_completion")
        return {**head, "choices": [dict(choice, logprobs=None, finish_reason=None)]}

    def usage_chunk(self, completion: Completion, chat: bool) -> dict[str, Any]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        return {**self._head(kind), "choices": [], "usage": _usage(completion)}


def _usage(completion: Completion) -> dict[str, int]:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
    }


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _chat_logprobs(choice: Choice, start: int, stop: int | None) -> dict[str, Any] | None:
    if choice.logprobs is None:
        return None
    content = [
        {**_token(e.token, e.logprob), "top_logprobs": [_token(t, lp) for t, lp in e.top]}
        for e in choice.logprobs[start:stop]
    ]
    return {"content": content, "refusal": None} if content else None


def _text_logprobs(
    choice: Choice, start: int, stop: int | None, offset: int
) -> dict[str, Any] | None:
    if choice.logprobs is None:
        return None
    entries = choice.logprobs[start:stop]
    if not entries:
        return None
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e.token)
    return {
        "tokens": [e.token for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [dict(e.top) for e in entries],
        "text_offset": offsets,
    }


def _stream(
    streaming: AsyncGenerator[Delta | Completion, None],
    answer: _Answer,
    chat: bool,
    include_usage: bool,
) -> EventSourceResponse:
    """Server-sent events: an opening chunk at once, each choice's text as it is decoded,
    the rest and the finish reasons when the completion is done, its usage if asked for,
    then ``[DONE]``. A failure after the stream started is an ``error`` event (the openai
    client raises it). A client that leaves ends ``streaming`` (samples not yet started
    are cancelled; started ones run to their end)."""
    chunks = answer.chat_chunks if chat else answer.text_chunks

    async def events() -> AsyncIterator[dict[str, str]]:
        for chunk in chunks(None):
            yield {"data": json.dumps(chunk)}
        completion: Completion | None = None
        try:
            # Closed here, not whenever it is collected: a client that leaves cancels
            # its samples at once.
            async with contextlib.aclosing(streaming):
                async for item in streaming:
                    if isinstance(item, Delta):
                        yield {"data": json.dumps(answer.delta_chunk(item, chat))}
                    else:
                        completion = item
        except (UserInputError, NotFound) as exc:
            yield {"data": json.dumps(_error_body(message_of(exc), "invalid_request_error"))}
            return
        except Exception as exc:  # the sampler's fault; the status line has gone already
            yield {"data": json.dumps(_error_body(str(exc), "server_error"))}
            return
        assert completion is not None, "a stream ends with its completion"
        for chunk in chunks(completion):
            yield {"data": json.dumps(chunk)}
        if include_usage:
            yield {"data": json.dumps(answer.usage_chunk(completion, chat))}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events())


def _error_body(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}
