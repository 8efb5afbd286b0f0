"""Sampling: sampling sessions and ``asample``."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from treadle.errors import UserInputError
from treadle.server.deps import ServiceDep, UserDep

router = APIRouter(prefix="/api/v1")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", protected_namespaces=())


class CreateSamplingSessionRequest(_Lenient):
    session_id: str
    sampling_session_seq_id: int = 0
    base_model: str | None = None
    model_path: str | None = None


class JoinSamplingSessionRequest(_Lenient):
    sampling_session_id: str


class Chunk(_Lenient):
    type: str = "encoded_text"
    tokens: list[int] = []


class ModelInput(_Lenient):
    chunks: list[Chunk]


class SamplingParams(_Lenient):
    max_tokens: int | None = None
    seed: int | None = None
    stop: str | list[int] | list[str] | None = None
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    # Not carried by the SDK's SamplingParams (yet); accepted from raw HTTP clients.
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class SampleRequest(_Lenient):
    sampling_session_id: str
    seq_id: int = 0
    num_samples: int = 1
    prompt: ModelInput
    sampling_params: SamplingParams = SamplingParams()
    prompt_logprobs: bool = False
    topk_prompt_logprobs: int = 0


@router.post("/create_sampling_session")
async def create_sampling_session(
    body: CreateSamplingSessionRequest, service: ServiceDep, user: UserDep
) -> dict[str, str]:
    sampler_id = service.sampling.create_session(
        user, body.session_id, body.sampling_session_seq_id, body.base_model, body.model_path
    )
    return {"type": "create_sampling_session", "sampling_session_id": sampler_id}


@router.post("/join_sampling_session")
async def join_sampling_session(
    body: JoinSamplingSessionRequest, service: ServiceDep, user: UserDep
) -> dict[str, Any]:
    # A SamplingClient rebuilt from a handle or a pickle numbers its samples in its own
    # block of seq_ids (clone id x 10**9): a new clone id per join.
    clone = service.sampling.join(user, body.sampling_session_id)
    return {"type": "join_sampling_session", "client_counter": clone}


@router.get("/samplers/{sampler_id}")
async def get_sampler(sampler_id: str, service: ServiceDep, user: UserDep) -> dict[str, Any]:
    session = service.sampling.session(user, sampler_id)
    answer: dict[str, Any] = {"sampler_id": sampler_id, "base_model": session.base_model}
    if session.model_path:
        answer["model_path"] = session.model_path
    return answer


@router.post("/asample")
async def asample(body: SampleRequest, service: ServiceDep, user: UserDep) -> dict[str, Any]:
    tokens: list[int] = []
    for chunk in body.prompt.chunks:
        if chunk.type != "encoded_text":
            raise UserInputError(f"prompt has a {chunk.type} chunk; send encoded_text only")
        tokens += chunk.tokens
    params = body.sampling_params
    call = service.sampling.check(
        user,
        body.sampling_session_id,
        body.seq_id,
        np.asarray(tokens, dtype=np.int64),
        body.num_samples,
        params.max_tokens,
        params.temperature,
        params.top_k,
        params.top_p,
        params.min_p,
        params.seed,
        params.stop,
        (params.repetition_penalty, params.presence_penalty, params.frequency_penalty),
        body.prompt_logprobs,
        body.topk_prompt_logprobs,
    )
    request_id = service.sampling.sample(user, call)
    return {"request_id": request_id, "sample_sequence_ids": call.sequence_ids()}
