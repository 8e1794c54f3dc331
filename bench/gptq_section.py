"""The engine benchmark's GPTQ section (bench/engine_bench.py): the engine on the default GPTQ
model; when vLLM is among the peers, both engines on the portable (symmetric) checkpoint
`make peers` writes; then the equal-work pair (EOS ignored); and their verdict lines."""

from __future__ import annotations

from benchrow import Job, Row  # bench/, beside this script
from enginerow import engine_row  # bench/enginerow.py
from peers.rows import (  # bench/peers/rows.py
    PORTABLE_TAG,
    peer_rows,
    peer_setup,
    portable_gptq,
    same_tokens,
)

from inferq.settings import DEFAULT_MODEL, FP_MODEL, get_settings
from worker.prep.models import resolve_model


def gptq_rows(
    args, jobs: list[Job], shareable: int, eos_ids: list[int], notes: list[str]
) -> list[Row]:
    """The engine with prefix cache on the default GPTQ model, dtype auto (bf16 on CPU); with
    vLLM among the peers, the engine and vLLM (bf16 activations) on `args.portable_gptq`; then,
    unless --no-equal-work, bf16 and GPTQ with EOS ignored (the same output tokens)."""
    gptq = str(resolve_model(get_settings(), DEFAULT_MODEL))
    cfg = get_settings().engine_config(prefix_cache=True, max_num_seqs=args.max_num_seqs)
    rows = [engine_row("engine-prefix-cache gptq", gptq, args.device, jobs, cfg, shareable, "auto")]
    portable, why = portable_gptq(args.peers, args.portable_gptq)
    notes += [why] if why else []
    if portable is not None:
        name = f"engine-prefix-cache {PORTABLE_TAG}"
        rows.append(engine_row(name, str(portable), args.device, jobs, cfg, shareable, "auto"))
        setup = peer_setup(str(portable), eos_ids)
        peers = args.out / "peers"
        rows += peer_rows(["vllm"], "bfloat16", PORTABLE_TAG, jobs, shareable, setup, peers, notes)
    if args.equal_work:
        fp = str(resolve_model(get_settings(), FP_MODEL))
        for name, path, dtype in (("bf16", fp, "bfloat16"), ("gptq", gptq, "auto")):
            rows.append(
                engine_row(
                    f"engine-prefix-cache-to-max {name}",
                    path,
                    args.device,
                    jobs,
                    cfg,
                    shareable,
                    dtype,
                    ignore_eos=True,
                )
            )
    return rows


def gptq_verdicts(rows: dict[str, Row]) -> list[str]:
    """Output tok/s against the bf16 engine (the target), and, since the 4-bit model stops on
    EOS at other points, the same workload's wall time and computed positions per second; the
    same for the equal-work (to-max) pair; the portable checkpoint's engine row against the
    default's."""
    lines = []
    for system in ("engine-prefix-cache", "engine-prefix-cache-to-max"):
        gptq, bf16 = rows.get(f"{system} gptq"), rows.get(f"{system} bf16")
        if gptq is None or bf16 is None:
            continue
        x, ok = gptq.tps / bf16.tps, gptq.tps >= bf16.tps
        pos = (gptq.computed / gptq.wall_s) / (bf16.computed / bf16.wall_s)
        verdict = "MET" if ok else "NOT MET"
        wall = bf16.wall_s / gptq.wall_s
        lines.append(
            f"- {gptq.name} vs {bf16.name}: {x:.2f}x output tok/s (target ≥1.0x: {verdict}); "
            f"greedy tokens equal {same_tokens(gptq, bf16)}; {gptq.out_tokens} vs "
            f"{bf16.out_tokens} output tokens; the workload's wall {wall:.2f}x; computed "
            f"positions per second {pos:.2f}x"
        )
    sym, default = (
        rows.get(f"engine-prefix-cache {PORTABLE_TAG}"),
        rows.get("engine-prefix-cache gptq"),
    )
    if sym is not None and default is not None:
        lines.append(
            f"- {sym.name} vs {default.name}: {sym.tps / default.tps:.2f}x output tok/s; "
            f"greedy tokens equal {same_tokens(sym, default)}; {sym.out_tokens} vs "
            f"{default.out_tokens} output tokens"
        )
    return lines
