"""The decode kernel (engine/thin_matmul.cpp) and the projections built on it, against
products computed independently in float64."""

from __future__ import annotations

import platform

import pytest
import torch

from treadle.engine import thin_matmul as tm
from treadle.engine.lora import LoraLinear, new_adapter
from treadle.engine.pass_context import Span, routing
from treadle.engine.projection import project_t
from treadle.types import LoraSpec


def _reference(weight, x_t, lora=None):
    y = weight.double() @ x_t.double()
    if lora is not None:
        y += lora[0].double() @ lora[1].double()
    return y


def _close(got, want):
    # fp32 sums of K products: the order differs from float64's, nothing else.
    scale = want.abs().max().item() + 1.0
    assert (got.double() - want).abs().max().item() <= 1e-5 * scale


def test_kernel_is_built_on_avx2_x86():
    avx2 = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    assert (tm.kernel() is not None) == (avx2 and x86)


@pytest.mark.parametrize("rows", [1, 5, 6, 7, 13, 100])
@pytest.mark.parametrize("columns", [1, 2, 7, 8, 9, 16, 17, 33, 64])
def test_products_match_float64(rows, columns):
    if tm.kernel() is None:
        pytest.skip("no AVX2 kernel on this machine")
    gen = torch.Generator().manual_seed(rows * 100 + columns)
    for inner in (3, 64, 577):
        weight = torch.randn(rows, inner, generator=gen)
        x_t = torch.randn(inner, columns, generator=gen)
        b, low = torch.randn(rows, 4, generator=gen), torch.randn(4, columns, generator=gen)
        out = torch.full((rows, columns), float("nan"))
        assert tm.thin_matmul(out, weight, x_t)
        _close(out, _reference(weight, x_t))
        # Into a transposed view (rows of a [columns, rows] buffer), with a LoRA term.
        rows_out = torch.full((columns, rows), float("nan"))
        assert tm.thin_matmul(rows_out.t(), weight, x_t, (b, low))
        _close(rows_out.t(), _reference(weight, x_t, (b, low)))


def test_declines_what_it_does_not_handle():
    if tm.kernel() is None:
        pytest.skip("no AVX2 kernel on this machine")
    weight = torch.randn(12, 8)
    cases = [
        (torch.zeros(12, 65), weight, torch.randn(8, 65)),  # beyond MAX_COLUMNS
        (torch.zeros(12, 4, dtype=torch.float64), weight.double(), torch.randn(8, 4).double()),
    ]
    for out, w, x_t in cases:
        before = out.clone()
        assert not tm.thin_matmul(out, w, x_t)
        assert torch.equal(out, before)
    # Operands it cannot read are errors, not silent fallbacks: callers shape them.
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        tm.thin_matmul(torch.zeros(12, 4), weight, torch.randn(4, 8).t())
    with pytest.raises(RuntimeError, match="float32 only"):
        tm.thin_matmul(torch.zeros(12, 4), weight, torch.randn(8, 4).double())
    with pytest.raises(RuntimeError, match="shapes do not match"):
        tm.thin_matmul(torch.zeros(12, 4), weight, torch.randn(9, 4))


def _layers(gen):
    q = LoraLinear(torch.nn.Linear(40, 24, bias=False), "q_proj", "attn")
    k = LoraLinear(torch.nn.Linear(40, 8, bias=False), "k_proj", "attn")
    for layer in (q, k):
        torch.nn.init.normal_(layer.base.weight, generator=gen)
    return q, k


def _adapter(layers, seed):
    adapter = new_adapter(LoraSpec(rank=4, alpha=8.0), {p.path: p for p in layers}, seed=seed)
    with torch.no_grad():
        for pair in adapter.pairs.values():
            pair.b.normal_(0, 1.0)
    return adapter.detached()


@pytest.mark.parametrize("use_kernel", ["1", "0"])
def test_projections_with_routed_adapters(monkeypatch, use_kernel):
    """project_t (the kernel with fused LoRA, or torch.mm and the span-wise deltas)
    equals x·Wᵀ + scale·x·Aᵀ·Bᵀ per row for one adapter, mixed adapters, and none."""
    monkeypatch.setenv("TREADLE_THIN_MATMUL", use_kernel)
    tm.kernel.cache_clear()
    try:
        gen = torch.Generator().manual_seed(0)
        layers = _layers(gen)
        weight = torch.cat([p.base.weight.data for p in layers])
        first, second = _adapter(layers, 1), _adapter(layers, 2)
        x = torch.randn(10, 40, generator=gen)

        def want(adapters):
            rows = []
            for i, adapter in enumerate(adapters):
                outs = []
                for p in layers:
                    y = x[i].double() @ p.base.weight.double().t()
                    if adapter is not None:
                        pair = adapter.pairs[p.path]
                        y += (
                            adapter.spec.scale
                            * (x[i].double() @ pair.a.double().t())
                            @ (pair.b.double().t())
                        )
                    outs.append(y)
                rows.append(torch.cat(outs))
            return torch.stack(rows).t()

        second_rows = torch.tensor([1, 4, 7])
        first_rows = torch.tensor([i for i in range(10) if i not in (1, 4, 7)])
        cases = [
            ([], [None] * 10),
            ([Span(first, rows=slice(0, 10))], [first] * 10),
            (
                [Span(first, rows=first_rows), Span(second, rows=second_rows)],
                [second if i in (1, 4, 7) else first for i in range(10)],
            ),
            (
                [Span(second, rows=second_rows)],
                [second if i in (1, 4, 7) else None for i in range(10)],
            ),
        ]
        with torch.no_grad():
            for spans, adapters in cases:
                out_t = torch.full((32, 10), float("nan"))
                rows = torch.full((10, 32), float("nan"))  # written through a transposed view
                with routing(spans):
                    project_t(x.t(), layers, weight, out_t)
                    project_t(x.t(), layers, weight, rows.t())
                _close(out_t, want(adapters))
                _close(rows.t(), want(adapters))
    finally:
        tm.kernel.cache_clear()
