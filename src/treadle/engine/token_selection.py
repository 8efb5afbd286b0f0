"""Choosing the next token from a batch of logits: penalties, filters, drawing.

Pure functions of tensors and per-row parameters; the sampler calls :func:`choose` once
per pass. Row ``i`` follows ``params[i]``: greedy at temperature 0, else a draw after
temperature, top-k, top-p and min-p (vLLM's order), by inverting the row's CDF at one
uniform number from the row's own generator, so a seeded sequence is the same whatever
it shares a batch with. The logprob reported for a token is always the model's own
(temperature 1, no filter, no penalty): what the trainer's forward computes.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from treadle.sampling_params import SamplingParams


def row_generator(seed: int | None, index: int) -> torch.Generator:
    """Sample ``index`` of a request gets its own stream, derived from the request's seed
    (or a fresh random one), so samples differ and a seeded request is reproducible."""
    root = secrets.randbits(64) if seed is None else seed % 2**64
    state = np.random.SeedSequence([root, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def choose(
    logits: Tensor,
    params: Sequence[SamplingParams],
    prompts: Sequence[np.ndarray],
    generated: Sequence[Sequence[int]],
    generators: Sequence[torch.Generator],
) -> tuple[list[int], list[float]]:
    """The next token of each row of float32 ``logits`` ``[rows, vocab]`` and its logprob
    under the model itself. ``prompts``/``generated`` are each row's tokens so far (for
    penalties)."""
    norm = torch.logsumexp(logits, -1)
    scores = penalise(logits, params, prompts, generated)
    chosen = torch.empty(len(params), dtype=torch.long, device=logits.device)
    greedy = [i for i, p in enumerate(params) if p.temperature == 0]
    drawn = [i for i, p in enumerate(params) if p.temperature != 0]
    if greedy:
        rows = _index(greedy, len(params), logits.device)
        chosen[rows] = scores[rows].argmax(-1)
    if drawn:
        rows = _index(drawn, len(params), logits.device)
        chosen[rows] = draw(
            scores[rows], [params[i] for i in drawn], [generators[i] for i in drawn]
        )
    logprobs = logits.gather(-1, chosen[:, None])[:, 0] - norm
    return chosen.tolist(), logprobs.tolist()


def _index(rows: list[int], total: int, device: torch.device) -> slice | Tensor:
    return slice(None) if len(rows) == total else torch.tensor(rows, device=device)


def penalise(
    logits: Tensor,
    params: Sequence[SamplingParams],
    prompts: Sequence[np.ndarray],
    generated: Sequence[Sequence[int]],
) -> Tensor:
    """``logits`` with each row's penalties applied (a copy; ``logits`` is kept):
    repetition (HF/vLLM: positive logits of tokens seen in prompt or output divided by it,
    negative ones multiplied), then presence and frequency (OpenAI/vLLM, over generated
    tokens: ``logit -= presence·[n > 0] + frequency·n``)."""
    rows = [i for i, p in enumerate(params) if p.penalised]
    if not rows:
        return logits
    out = logits.clone()
    for i in rows:
        p, row = params[i], out[i]
        tokens = torch.tensor(list(generated[i]), dtype=torch.long, device=logits.device)
        if p.repetition_penalty != 1.0:
            prompt = torch.from_numpy(prompts[i]).to(logits.device)
            seen = torch.unique(torch.cat([prompt, tokens]))
            values = row[seen]
            penalty = p.repetition_penalty
            row[seen] = torch.where(values > 0, values / penalty, values * penalty)
        if tokens.numel():
            ids, counts = torch.unique(tokens, return_counts=True)
            row[ids] -= p.frequency_penalty * counts + p.presence_penalty
    return out


def draw(
    scores: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator]
) -> Tensor:
    """One token per row after temperature, top-k, top-p and min-p, by inverting the row's
    CDF at one uniform draw from its generator."""
    device = scores.device
    if any(p.temperature != 1.0 for p in params):
        temperature = torch.tensor([p.temperature for p in params], device=device)
        scores = scores / temperature[:, None]
    elif any(p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0.0 for p in params):
        scores = scores.clone()  # the filters below write in place; the caller's stay
    top_k(scores, [p.top_k for p in params])
    top_p(scores, [p.top_p for p in params])
    min_p(scores, [p.min_p for p in params])
    cdf = torch.softmax(scores, -1).cumsum_(-1)
    uniform = torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)
    # right=True: the first token whose CDF exceeds the draw, never a zero-probability one.
    chosen = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0]
    return chosen.clamp_(max=scores.shape[-1] - 1)


def top_k(scores: Tensor, ks: Sequence[int]) -> None:
    """Keep each row's ``k`` highest scores (and ties with the k-th, as HF and vLLM do);
    ``k`` of -1 or 0 keeps all. In place."""
    vocab = scores.shape[-1]
    rows = [i for i, k in enumerate(ks) if 0 < k < vocab]
    if not rows:
        return
    index = torch.tensor(rows, device=scores.device)
    part = scores[index]
    k = torch.tensor([ks[i] for i in rows], device=scores.device)
    top = torch.topk(part, int(k.max()), dim=-1).values
    threshold = top.gather(-1, (k - 1)[:, None])
    scores[index] = part.masked_fill(part < threshold, -math.inf)


def top_p(scores: Tensor, ps: Sequence[float]) -> None:
    """Keep each row's smallest set of highest-probability tokens whose mass reaches
    ``p`` (always at least the top token). In place."""
    rows = [i for i, p in enumerate(ps) if p < 1.0]
    if not rows:
        return
    index = torch.tensor(rows, device=scores.device)
    ordered, order = scores[index].sort(-1, descending=True)
    probs = torch.softmax(ordered, -1)
    before = probs.cumsum(-1) - probs
    drop = before >= torch.tensor([ps[i] for i in rows], device=scores.device)[:, None]
    drop[:, 0] = False
    ordered.masked_fill_(drop, -math.inf)
    scores[index] = torch.empty_like(ordered).scatter_(-1, order, ordered)


def min_p(scores: Tensor, ps: Sequence[float]) -> None:
    """Drop tokens whose probability is below ``p`` times the row's top probability.
    In place."""
    rows = [i for i, p in enumerate(ps) if p > 0.0]
    if not rows:
        return
    index = torch.tensor(rows, device=scores.device)
    part = scores[index]
    # prob < min_p · prob_max  <=>  score < max score + log(min_p)
    floor = torch.tensor([math.log(ps[i]) for i in rows], device=scores.device)[:, None]
    scores[index] = part.masked_fill(part < part.max(-1, keepdim=True).values + floor, -math.inf)
