"""GPTQ per-shape kernel choice on CPU: the dequantizer reproduces the int4 kernel's weights
exactly (compiled and torch fallback, with act-order), the fused int4 GEMM multiplies by them,
and the dispatching linear routes few rows to int4 and many to the fused GEMM or dequantize +
dense with matching outputs."""

from __future__ import annotations

import pytest
import torch

from worker.engine import gptq_dequant, gptq_dispatch, gptq_gemm, native
from worker.engine.engine import PagedEngine
from worker.engine.gptq_dispatch import NEVER, DispatchLinear, FusedDispatch, measure_crossover

GROUP = 32


def _packed(k: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random codes packed for the CPU int4 kernel, its (scale, offset) pairs and W^T as that
    kernel computes it (bf16 [k, n], from an identity input)."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    scales = torch.rand(k // GROUP, n, generator=gen) * 0.02
    offsets = (torch.rand(k // GROUP, n, generator=gen) - 0.5) * 0.02
    sz = torch.stack([scales, offsets], -1).to(torch.bfloat16).contiguous()
    eye = torch.eye(k, dtype=torch.bfloat16)
    return packed, sz, torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, GROUP, sz)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(("k", "n"), [(64, 64), (96, 192), (576, 1536), (1536, 576)])
def test_dequantize_is_exactly_the_int4_kernels_weight(
    compiled: bool, k: int, n: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """bf16: the int4 kernel's own weights bit for bit; fp32: the same before rounding. (Where
    the kernel packs 32-row blocks, AVX2, it rounds scale * code before adding the offset, and
    a weight next to zero may differ by one fp32 rounding of that product.)"""
    if compiled:
        assert gptq_dequant.c_kernel() is not None, "no C compiler: the fallback would run"
    else:
        monkeypatch.setattr(gptq_dequant, "c_kernel", lambda: None)
    packed, sz, want = _packed(k, n)
    bn = gptq_dequant.block_n()
    assert bn in (32, 64), "the int4 kernel's packed layout is none the dequantizer knows"

    def same(got: torch.Tensor, expected: torch.Tensor) -> bool:
        got = got.to(torch.bfloat16)
        if bn == 32:  # one fp32 rounding of a product of at most 0.02 x 8
            return (got.float() - expected.float()).abs().max().item() <= 2**-24 * 0.16
        return torch.equal(got, expected)

    assert dtype in (torch.bfloat16, torch.float32)

    out = torch.full((k, n), float("nan"), dtype=dtype)
    assert same(gptq_dequant.dequantize(packed, sz, GROUP, out), want) and out.dtype == dtype
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(1)).to(torch.int32)
    scattered = gptq_dequant.dequantize(packed, sz, GROUP, torch.empty_like(out), perm)
    assert same(scattered[perm.long()], want)  # packed row j lands at row perm[j]
    part = torch.empty(k, n - bn, dtype=dtype)
    assert same(gptq_dequant.dequantize(packed, sz, GROUP, part, blocks=(1, n // bn)), want[:, bn:])
    wide = torch.full((k, n + 128), float("nan"), dtype=dtype)  # a column slice: strided rows
    gptq_dequant.dequantize(packed, sz, GROUP, wide[:, 64 : 64 + n], perm)
    assert same(wide[:, 64 : 64 + n][perm.long()], want)
    assert wide[:, :64].isnan().all() and wide[:, 64 + n :].isnan().all()


def _close_to_product(got: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """got = x @ weight up to fp32 sums in another order (fp32 got), then one bf16 rounding
    (bf16 got). (On AVX2 a weight may round to the next bf16: see above.)"""
    exact = x.double() @ weight.double()
    bound = x.double().abs() @ weight.double().abs()  # error scale of a sum of products
    slack = 2**-8 * exact.abs() if got.dtype == torch.bfloat16 else 0
    return bool(((got.double() - exact).abs() <= bound * 2**-12 + slack).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("k", "n"), [(64, 64), (96, 192), (576, 1536), (1536, 576)])
def test_fused_gemm_multiplies_by_the_int4_kernels_weight(
    k: int, n: int, dtype: torch.dtype
) -> None:
    """x @ W^T with W the int4 kernel's weights (below GEMV_ROWS rows, straight from the codes:
    those weights before their bf16 rounding), for row counts on and off the micro-kernel's
    blocking, into a column slice of a wider buffer."""
    assert gptq_gemm.available(), "no C compiler, or a packed layout the kernel does not run"
    packed, sz, rounded = _packed(k, n)
    exact = gptq_dequant.dequantize(packed, sz, GROUP, torch.empty(k, n))
    gemm = gptq_gemm.Int4Gemm([(packed, sz)], GROUP)
    gen = torch.Generator().manual_seed(2)
    for rows in (1, 2, 3, 7, 13, 45, 128):  # 1-7: straight from the codes; 45: 32 on AMX tiles
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        wide = torch.full((rows, n + 96), float("nan"), dtype=dtype)
        got = gemm(x, wide[:, 32 : 32 + n])
        assert wide[:, :32].isnan().all() and wide[:, 32 + n :].isnan().all()
        assert _close_to_product(got, x, exact if rows < gptq_gemm.GEMV_ROWS else rounded)


def test_fused_gemm_runs_linears_side_by_side_with_their_act_order() -> None:
    """Three linears of one input in one call, x's columns gathered in their packed order
    (from a strided x: a column slice)."""
    k, outs = 576, (576, 192, 192)
    parts = [_packed(k, n, seed=i) for i, n in enumerate(outs)]
    order = torch.randperm(k, generator=torch.Generator().manual_seed(3)).to(torch.int32)
    gemm = gptq_gemm.Int4Gemm([(p, sz) for p, sz, _ in parts], GROUP, order)
    assert gemm.out_features == sum(outs)
    weight = torch.cat([w for _, _, w in parts], dim=1)  # packed row j meets input order[j]
    exact = [
        gptq_dequant.dequantize(p, sz, GROUP, torch.empty(k, w.shape[1])) for p, sz, w in parts
    ]
    wide = torch.randn(37, k + 8, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    for rows, w in ((1, torch.cat(exact, dim=1)), (37, weight)):  # from the codes; tiles
        x = wide[:rows, 8:]
        got = gemm(x, torch.empty(rows, sum(outs), dtype=torch.bfloat16))
        assert _close_to_product(got, x[:, order.long()], w)
    x = wide[:, 8:]
    assert torch.equal(gptq_gemm.gather_columns(x, order), x[:, order.long()])


def test_cache_dir_is_configured(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """The engine's config names the kernel dir (the service: INFERQ_HOME/kernels)."""
    monkeypatch.setattr(native, "_kernel_dir", [])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_dir() == tmp_path / "xdg" / "inferq" / "kernels"
    native.configure(str(tmp_path / "home" / "kernels"))
    native.configure(str(tmp_path / "other"))  # the first one holds for the process
    assert native.cache_dir() == tmp_path / "home" / "kernels"


# -- the default model, as the engine loads it ---------------------------------------------


def _layers(engine: PagedEngine) -> list[DispatchLinear]:
    return [m for m in engine.runner.model.modules() if isinstance(m, DispatchLinear)]


@pytest.mark.model
def test_default_model_linears_all_dispatch(gptq_engine: PagedEngine) -> None:
    layers = _layers(gptq_engine)
    config = gptq_engine.runner.model.config
    assert len(layers) == 7 * config.num_hidden_layers
    assert {type(m.inner).__name__ for m in layers} == {"TorchAtenLinear"}
    assert all(m.crossover > 1 for m in layers)  # the many-row path starts at 8 rows or more


@pytest.mark.model
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize(
    "name", ["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj"]
)
def test_default_model_many_row_path_matches_int4(
    gptq_engine: PagedEngine, name: str, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = gptq_engine.runner.model.get_submodule(f"model.layers.3.{name}")
    assert isinstance(layer, DispatchLinear)
    with torch.inference_mode():
        eye = torch.eye(layer.in_features, dtype=torch.bfloat16)
        dense_weight = layer.dense_weight().to(torch.bfloat16)
        assert torch.equal(dense_weight, layer.inner(eye))  # act-order undone exactly
        x = torch.randn(2, 96, layer.in_features, dtype=torch.bfloat16)
        int4 = layer.inner(x)  # gptqmodel's forward
        assert torch.equal(layer.int4(x.view(-1, layer.in_features)).view_as(int4), int4)
        monkeypatch.setattr(layer, "gemv_below", gptq_gemm.GEMV_ROWS)  # 3 rows from the codes
        codes = layer(x[0, :3])
        monkeypatch.setattr(layer, "crossover", 1)
        monkeypatch.setattr(layer, "fused", fused)
        dense = layer(x)
    assert dense.shape == int4.shape == (2, 96, layer.out_features)
    for got, want in ((dense, int4), (codes, int4[0, :3])):
        gap = (got.float() - want.float()).abs().max()
        assert gap <= 2**-6 * want.float().abs().max()  # bf16 rounding of sums in another order


@pytest.mark.model
@pytest.mark.parametrize("fused", [True, False])
def test_routing_by_rows(
    gptq_engine: PagedEngine, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = gptq_engine.runner.model.get_submodule("model.layers.0.mlp.gate_proj")
    calls: list[str] = []
    monkeypatch.setattr(layer, "crossover", 64)
    monkeypatch.setattr(layer, "fused", fused)
    monkeypatch.setattr(layer, "gemv_below", 0)
    dense_weight, gemm, int4 = layer.dense_weight, layer.gemm, layer.int4
    monkeypatch.setattr(layer, "dense_weight", lambda: calls.append("dense") or dense_weight())
    monkeypatch.setattr(layer, "gemm", lambda x, out: calls.append("fused") or gemm(x, out))
    monkeypatch.setattr(layer, "int4", lambda x: calls.append(f"int4 {len(x)}") or int4(x))

    def route(*shape: int) -> list[str]:
        calls.clear()
        out = layer(torch.randn(*shape, layer.in_features, dtype=torch.bfloat16))
        assert out.shape == (*shape, layer.out_features)
        return calls[:]

    with torch.inference_mode():
        assert route(1) + route(1, 63) == ["int4 1", "int4 63"]
        assert route(4, 16) == ["fused" if fused else "dense"]
        monkeypatch.setattr(layer, "gemv_below", 4)  # where the codes' GEMV measured faster
        assert route(3) + route(4) == ["fused", "int4 4"]
        monkeypatch.setattr(layer, "dense_from", 100)  # a fused shape's dense range (AMX)
        assert route(99) + route(100) == (["fused", "dense"] if fused else ["dense", "dense"])


@pytest.mark.model
def test_measured_crossover_is_int4_at_one_row(
    gptq_engine: PagedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """int4 wins at 1 row by 10x or more over dequantize-then-dense (whether dense wins at 512
    by 2x, as it does on an idle CPU, is left to the benchmark: an oversubscribed CPU slows the
    dense matmul most). (The fused GEMM at 1 row is within 1.5x of int4, too close for a noisy
    CPU to order: the load-time ladder starts at 8 rows, so one row takes int4 unless the
    fused GEMM's path straight from the codes measures faster there: `gemv_below`.)"""
    layer = gptq_engine.runner.model.get_submodule("model.layers.0.self_attn.o_proj")
    monkeypatch.setattr(layer, "fused", False)
    assert measure_crossover(layer, ladder=(1, 512)) > 1
    assert gptq_dispatch.LADDER[0] > 1


@pytest.mark.parametrize(
    ("dense_wins", "crossover"),
    [
        ((False, False, True, True, True, True), 32),
        ((False, False, True, False, True, True), 32),  # one noisy point does not decide
        ((False, True, False, False, False, True), 256),
        ((False, False, False, False, False, False), gptq_dispatch.NEVER),
        ((True,) * 6, 8),
    ],
)
def test_crossover_rule(
    dense_wins: tuple[bool, ...], crossover: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    wins = iter(dense_wins)
    monkeypatch.setattr(gptq_dispatch, "_best_us", lambda fns: (1.0, 0.5 if next(wins) else 2.0))
    layer = type("Fake", (), {"in_features": 8})()
    assert measure_crossover(layer) == crossover


def test_overrides_from_the_config() -> None:
    """Both overrides apply without measuring (the fake has no kernels to measure)."""

    class Fake:
        in_features, out_features, group_size = 8, 64, 32
        crossover, fused = NEVER, True

    layer = Fake()
    gptq_dispatch.plan(layer, crossover="40", many="dense")
    assert (layer.crossover, layer.fused) == (40, False)


@pytest.mark.model
def test_fused_projection_is_its_layers_side_by_side(
    gptq_engine: PagedEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """q/k/v as one FusedDispatch: its dense weight is the layers' weights side by side, and
    every path gives the concatenated outputs of the layers' own forwards (up to bf16 rounding
    of sums in another order on the many-row paths)."""
    attn = gptq_engine.runner.model.get_submodule("model.layers.2.self_attn")
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    assert FusedDispatch.fusable(layers) and not FusedDispatch.fusable(layers[:1])
    fused = FusedDispatch(layers, None)
    assert fused.out_features == sum(m.out_features for m in layers)
    assert fused.crossover > 1
    with torch.inference_mode():
        side_by_side = torch.cat([m.dense_weight().clone() for m in layers], dim=1)
        assert torch.equal(fused.dense_weight(), side_by_side)
        for rows, path in ((3, True), (200, True), (200, False)):
            x = torch.randn(rows, fused.in_features, dtype=torch.bfloat16)
            # the many-row path (fused GEMM or dense), then int4, then (3 rows) the fused GEMM
            # straight from the codes: the same per-block arithmetic, one call or three
            routes = [(1, 0), (NEVER, 0)] + [(NEVER, gptq_gemm.GEMV_ROWS)] * (rows == 3)
            for crossover, gemv_below in routes:
                for m in [fused, *layers]:
                    monkeypatch.setattr(m, "crossover", crossover)
                    monkeypatch.setattr(m, "fused", path)
                    monkeypatch.setattr(m, "gemv_below", gemv_below)
                want, got = torch.cat([m(x) for m in layers], dim=-1), fused(x)
                if crossover == NEVER:
                    assert torch.equal(got, want)  # the same int4 (or codes) arithmetic
                else:  # one matmul over the side-by-side weights may block its sums otherwise
                    gap = (got.float() - want.float()).abs().max()
                    assert gap <= 2**-6 * want.float().abs().max()
