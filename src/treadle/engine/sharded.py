"""Sharded base models: the frozen base weights divided across the ranks of a group.

When a base model does not fit one device, each rank of a worker group holds ``1/N`` of
its weights: :func:`shard` applies FSDP2's ``fully_shard`` to every decoder layer and once
more at the root for the rest (embeddings, final norm, unembedding). A layer's weights
are all-gathered just before it runs and freed after it (forward, and again for its
backward), so a rank holds its shards plus about one layer whole. On CUDA the gathered
weights are bf16 (``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``); on CPU
everything stays fp32 (bf16 matmuls are ~100x slower there).

Every rank must run the same commands on the same data — the group broadcasts each
command, sampler steps included, and reports rank 0's results — so compute is replicated
and only the memory of the base weights is divided. That keeps the collectives in step
(every rank runs the same passes, so gathers the same layers in the same order) and
makes LoRA simple:

- Adapters are plain tensors outside the modules (:mod:`treadle.engine.lora`), never FSDP
  parameters. Each rank holds a full copy, computes the full gradient from the full
  batch and takes the same AdamW step, so the copies stay identical without any gradient
  collective, and the sum-not-mean contract needs no care (FSDP reduces, and would
  average, only gradients of the parameters it manages: the frozen base has none).
- For the same reason no LoRA slots are preallocated. The known trap — an adapter added
  after ``fully_shard`` silently gets no gradient — concerns adapter *parameters inside*
  the wrapped modules, which FSDP must see when it wraps them. FSDP never sees treadle's
  adapters, so they can be created, loaded and dropped at any time, at any rank and on
  any target modules, as in one process.

Two things treadle does outside the modules' own forwards need care:

- Packed passes run the backbone (not the root module's forward) and read the
  unembedding weight directly, so no FSDP hook gathers the root's weights for them:
  :meth:`Sharding.root_gathered` does, for the length of each training pass and sampler
  step (:meth:`treadle.engine.models.BaseLM.gathered`).
- The written-out decode stack (:mod:`treadle.engine.decode`) keeps its own fused views of
  whole weights, which a sharded model never has outside a layer's forward. A sharded
  model decodes through the stock modules instead (:meth:`Sharding.decode`), so FSDP's
  hooks gather each layer as it runs. It must therefore be sharded before its sampler is
  built.

**What sampling costs.** Every rank runs the identical sampler step on the identical
batch and rank 0 reports, so decoding does not scale with ranks: N ranks decode at most as
fast as one device holding the whole model, and every rank keeps the whole KV cache of
every sequence. Each decode step all-gathers every layer, i.e. each rank receives
``(N-1)/N`` of the model's bytes per step (about 7 GB for an 8 GB bf16 model on 8 ranks:
~20 ms over a ~400 GB/s NVLink, against ~2 ms to read the weights from HBM), on top of
the per-module overheads the decode stack avoids. The gather is paid once per step
whatever the batch, so sharded decoding wants large batches; prefill and training
passes, which are long, amortise it well. (No explicit prefetching is configured: on
CUDA a layer's gather overlaps the previous layer's compute as far as the host runs
ahead of the device; on CPU nothing overlaps.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from treadle.engine.kv_cache import CacheDecode
from treadle.engine.models import BaseLM
from treadle.engine.pass_context import decoding


@dataclass
class Sharding:
    """How a :class:`~treadle.engine.models.BaseLM`'s weights are divided: the root FSDP
    module (embeddings, final norm, unembedding) over one per decoder layer."""

    root: FSDPModule
    backbone: nn.Module
    # Nested root_gathered blocks: only the outermost gathers and frees.
    _depth: int = field(default=0, init=False)

    @contextlib.contextmanager
    def root_gathered(self) -> Iterator[None]:
        """Within this block the root's weights are whole on every rank (a collective:
        every rank must enter it). An error inside resets FSDP's per-pass state, so the
        next pass starts clean rather than finding layers stuck half-way."""
        self._depth += 1
        try:
            if self._depth == 1:
                self.root.unshard()
            yield
        except BaseException:
            if self._depth == 1:
                self.root.reset_iter_state()
            raise
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.root.reshard()

    def decode(self, tokens: Tensor, decode: CacheDecode) -> Tensor:
        """One decode step through the stock modules — the
        :class:`~treadle.engine.decode.DecodeStack` contract: ``[rows]`` token ids in,
        final-norm hidden states ``[rows, hidden]`` out, keys and values from ``decode``'s
        cache. The rows run as a batch of one-token sequences."""
        with decoding(decode):
            out = self.backbone(
                input_ids=tokens[:, None], position_ids=decode.positions[:, None], use_cache=False
            )
        hidden: Tensor = out.last_hidden_state[:, 0]
        return hidden


def shard(base: BaseLM, device: torch.device | str | None = None) -> Sharding:
    """Divide ``base``'s weights across the ranks of the initialised default process
    group; every rank calls this on its own copy of the same model (a collective).

    ``device`` is where the shards live (default: where ``base`` is). A model too large
    for one device is loaded on the CPU (in bf16: the shards keep the loaded dtype) and
    sharded onto the rank's GPU here: ``fully_shard`` moves each layer whole to the device
    just before cutting it, so the device never holds more than its shards plus one layer
    (the host, though, holds the whole model once per rank until then)."""
    if not dist.is_initialized():
        raise RuntimeError("shard needs an initialised torch.distributed process group")
    if base.sharding is not None:
        raise RuntimeError(f"{base.name} is already sharded")
    if any(_in_fused_buffer(layer.base.weight) for layer in base.layers.values()):
        raise RuntimeError(
            "shard the base model before building its sampler: the decode stack keeps"
            " views of whole weights"
        )
    target = torch.device(device) if device is not None else base.device
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    mesh: DeviceMesh = init_device_mesh(target.type, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy()
    if target.type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    backbone = base.backbone
    layers: Any = backbone.layers
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    # The root's own group: whatever no layer holds (embeddings, final norm, unembedding;
    # a tied unembedding is the embedding, one parameter in one group).
    root = fully_shard(base.model, mesh=mesh, mp_policy=policy)
    base.device = target
    sharding = Sharding(root=root, backbone=backbone)
    base.sharding = sharding
    # FSDP decides which module is the root at the first forward it sees. treadle's
    # passes start at the first decoder layer, which would then take the role; one token
    # through the root's own forward settles it (and checks every rank takes part).
    with torch.no_grad():
        base.model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=target))
    root.reshard()
    return sharding


def _in_fused_buffer(weight: Tensor) -> bool:
    # The decode stack re-points q/k/v and gate/up weights at slices of one buffer each.
    return weight.untyped_storage().nbytes() > weight.numel() * weight.element_size()
