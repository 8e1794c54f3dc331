"""GPTQ 4-bit vs the fp model it came from: quality, size, memory and speed in one table.

Usage: .venv/bin/python bench/gptq_report.py [--jobs 128] [--quick] [--out bench/out]
       .venv/bin/python bench/gptq_report.py --speed [--jobs 256] [--rounds 2]
Variants: fp32 (FP_MODEL, float32), fp bf16 (FP_MODEL, bfloat16: the fair speed reference on
a CPU with avx512_bf16) and GPTQ 4-bit (DEFAULT_MODEL, dtype auto: bf16 activations on CPU,
kernel chosen by worker.engine.loading). Every model is loaded through `load_causal_lm`.
- perplexity: worker/data/heldout.txt tokenized whole, non-overlapping 512-token windows,
  exp(sum of NLL / predicted tokens); `--quick` keeps its first 1024 tokens.
- disk: *.safetensors bytes; linear = q/k/v/o/gate/up/down projection tensors (GPTQ: qweight,
  qzeros, scales, g_idx), rest = tied embedding + norms. Loaded weights = unique parameter and
  buffer bytes after loading.
- RSS: whole-process peak (VmHWM, torch and libraries included) of a fresh subprocess that
  loads the model and generates 8 tokens; also its RSS after that generate.
- engine: engine_bench's seeded workload on the paged engine with the prefix cache.
- batch-1 decode: HF generate, the workload's first prompt, 64 new tokens (min_new_tokens=64),
  greedy; decode tok/s = 63 / (last step - first step). Engine batch-1: the paged engine, the
  workload's first 4 prompts one at a time (max_tokens 64), decode tokens after the first over
  the time from first token to finish.
`--speed` measures only the last two (fp bf16 vs GPTQ), alternating variants `--rounds` times
on the shared CPU: the engine rows and engine batch-1 decode.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import engine_bench as eb  # bench/engine_bench.py, beside this script
import numpy as np
import torch
from limits import matmul_peak_gflops  # bench/limits.py, beside this script
from transformers import AutoTokenizer, GenerationConfig, StoppingCriteriaList
from transformers.utils import logging as hf_logging

from inferq.params import EngineConfig
from inferq.settings import DEFAULT_MODEL, FP_MODEL, get_settings
from worker.engine.api import EngineRequest, SamplingParams, run_to_completion
from worker.engine.codec import TextCodec
from worker.engine.engine import PagedEngine
from worker.engine.loading import load_causal_lm, pick_device
from worker.prep.models import resolve_model

HELDOUT = Path(__file__).parents[1] / "worker" / "data" / "heldout.txt"
WINDOW = 512
LINEAR = re.compile(r"\.(q|k|v|o|gate|up|down)_proj\.")
RSS_TAG = "RSS-JSON "
HEAD = (
    "variant|kernel|activations|perplexity|Δ ppl vs fp32|disk MB|linear MB|rest MB|"
    "loaded weights MB|peak RSS MB|RSS after gen MB|engine out tok/s|p50 lat s|p50 TTFT s|"
    "batch-1 decode tok/s|engine batch-1 decode tok/s"
)
STARTED = time.perf_counter()


@dataclass(frozen=True)
class Variant:
    name: str
    model: str  # a known model name, resolved with resolve_model
    dtype: str


VARIANTS = (
    Variant("fp32", FP_MODEL, "float32"),
    Variant("fp bf16", FP_MODEL, "bfloat16"),
    Variant("GPTQ 4-bit", DEFAULT_MODEL, "auto"),
)


def say(msg: str) -> None:
    print(f"[gptq_report {time.perf_counter() - STARTED:6.0f}s] {msg}", file=sys.stderr, flush=True)


def disk_mb(path: Path) -> tuple[float, float, float]:
    """Total *.safetensors file MB, and the tensor MB of linear layers and of the rest."""
    total = linear = other = 0
    for file in sorted(path.glob("*.safetensors")):
        total += file.stat().st_size
        with file.open("rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            size = meta["data_offsets"][1] - meta["data_offsets"][0]
            linear += size if LINEAR.search(key) else 0
            other += 0 if LINEAR.search(key) else size
    return total / 1e6, linear / 1e6, other / 1e6


def loaded_mb(model: torch.nn.Module) -> float:
    """Bytes of the model's parameters and buffers, each storage counted once."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 1e6


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: list[int]) -> float:
    """exp(mean NLL) over non-overlapping WINDOW-token windows of `ids`."""
    nll, count = 0.0, 0
    for s in range(0, len(ids), WINDOW):
        window = torch.tensor(ids[s : s + WINDOW], device=model.device)
        if len(window) < 2:
            continue
        logits = model(window[None], use_cache=False).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
        count += len(window) - 1
    return float(np.exp(nll / count))


@torch.inference_mode()
def decode_tps(model: torch.nn.Module, prompt: list[int], pad_id: int, new: int = 64) -> float:
    """Batch-1 greedy HF generate decode rate, prefill excluded."""
    ids = torch.tensor([prompt], device=model.device)
    kw = dict(do_sample=False, pad_token_id=pad_id, attention_mask=torch.ones_like(ids))
    model.generate(ids, max_new_tokens=4, **kw)  # warm-up
    clock = eb.RowMaxTokens(ids.shape[1], [eb.Job("b1", 0, prompt, new)])
    model.generate(
        ids,
        max_new_tokens=new,
        min_new_tokens=new,
        stopping_criteria=StoppingCriteriaList([clock]),
        **kw,
    )
    return (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])


def engine_decode_tps(
    path: str, device: str, dtype: str, jobs: list[eb.Job], cfg: EngineConfig
) -> float:
    """Batch-1 decode rate through the paged engine: the first 4 jobs, one at a time."""
    engine = PagedEngine(path, "bench", device=device, dtype=dtype, config=cfg)
    engine.warm_up()
    tokens, seconds = 0, 0.0
    for job in jobs[:4]:
        params = SamplingParams(max_tokens=64)
        req = EngineRequest(seq_id=job.seq_id, prompt_ids=job.prompt_ids, params=params, tenant="t")
        (out,) = run_to_completion(engine, [req])
        tokens += len(out.token_ids) - 1
        seconds += out.finished_at - out.first_token_at
    del engine
    gc.collect()
    return tokens / seconds


def measure_rss(path: str, dtype: str, device: str) -> None:
    """Child side of `--measure-rss`: load, generate 8 tokens, print RSS as JSON."""
    loaded = load_causal_lm(path, pick_device(device), dtype)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The lighthouse keeper", return_tensors="pt")["input_ids"].to(loaded.model.device)
    with torch.inference_mode():
        loaded.model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    # VmHWM, not ru_maxrss: Linux carries the parent's peak over fork + exec into ru_maxrss.
    status = dict(ln.split(":", 1) for ln in Path("/proc/self/status").read_text().splitlines())
    mb = {k: int(status[k].split()[0]) * 1024 / 1e6 for k in ("VmHWM", "VmRSS")}
    print(RSS_TAG + json.dumps({"peak": mb["VmHWM"], "now": mb["VmRSS"]}), flush=True)


def rss_in_child(path: str, dtype: str, device: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--device", device, "--measure-rss", path, dtype]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith(RSS_TAG))[len(RSS_TAG) :])


def run_variant(v: Variant, args: argparse.Namespace, jobs: list[eb.Job], shareable: int) -> dict:
    """All measurements of one variant; the engine and the RSS child load it afresh."""
    path = resolve_model(get_settings(), v.model)
    say(f"{v.name}: loading {path} ({v.dtype})")
    loaded = load_causal_lm(path, pick_device(args.device), v.dtype)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok(HELDOUT.read_text())["input_ids"][: 1024 if args.quick else None]
    res: dict = {"disk": disk_mb(Path(path)), "kernel": loaded.kernel, "ntok": len(ids)}
    res |= {"act": str(loaded.dtype).removeprefix("torch."), "loaded": loaded_mb(loaded.model)}
    say(f"{v.name}: kernel {loaded.kernel}, {res['act']}; perplexity over {len(ids)} tokens")
    res["ppl"] = perplexity(loaded.model, ids)
    say(f"{v.name}: perplexity {res['ppl']:.3f}; batch-1 decode")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    res["b1"] = decode_tps(loaded.model, jobs[0].prompt_ids, pad)
    del loaded
    gc.collect()
    say(f"{v.name}: {res['b1']:.1f} decode tok/s; paged engine on {len(jobs)} jobs")
    cfg = get_settings().engine_config(max_num_seqs=args.max_num_seqs)
    res["row"] = eb.engine_row(v.name, path, args.device, jobs, cfg, shareable, v.dtype)
    res["eb1"] = engine_decode_tps(path, args.device, v.dtype, jobs, cfg)
    say(f"{v.name}: engine done in {res['row'].wall_s:.1f}s; peak RSS in a fresh subprocess")
    res["rss"] = rss_in_child(path, v.dtype, args.device)
    gc.collect()
    return res


def publish(lines: list[str], path: Path) -> Path:
    """Print a report and write it to `path` (its folder made as needed)."""
    text = "\n".join(lines)
    print(text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def out_tps(res: dict) -> float:
    """The engine row's output tokens per second."""
    return sum(map(len, res["row"].outputs.values())) / res["row"].wall_s


def table(results: dict[str, dict]) -> list[str]:
    """The markdown table, one row per variant."""
    lines = ["| " + HEAD.replace("|", " | ") + " |", "|" + "---|" * (HEAD.count("|") + 1)]
    ref = results["fp32"]["ppl"]
    for name, r in results.items():
        row, delta = r["row"], 100 * (r["ppl"] / ref - 1)
        cells = [name, r["kernel"], r["act"], f"{r['ppl']:.3f}", f"{delta:+.2f}%"]
        cells += [f"{x:.1f}" for x in (*r["disk"], r["loaded"], r["rss"]["peak"], r["rss"]["now"])]
        cells += [f"{out_tps(r):.1f}", f"{np.percentile(row.latency, 50):.2f}"]
        cells += [f"{np.percentile(row.ttft, 50):.2f}", f"{r['b1']:.1f}", f"{r['eb1']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


SPEED_VARIANTS = (  # name, model, dtype, EngineConfig.gptq_crossover
    ("fp bf16", FP_MODEL, "bfloat16", "auto"),
    ("GPTQ int4 only (before)", DEFAULT_MODEL, "auto", "off"),
    ("GPTQ per-shape dispatch", DEFAULT_MODEL, "auto", "auto"),
)


def speed_rows(args: argparse.Namespace, jobs: list[eb.Job], shareable: int) -> list[str]:
    """Engine speed only, SPEED_VARIANTS alternated `args.rounds` times; GPTQ / bf16 ratios."""
    from worker.engine import gptq_dispatch, gptq_gemm

    cfg = get_settings().engine_config(max_num_seqs=args.max_num_seqs)
    lines = [
        "| round | variant | engine out tok/s | engine batch-1 decode tok/s |",
        "|---|---|---|---|",
    ]
    got: dict[str, list[tuple[float, float]]] = {v[0]: [] for v in SPEED_VARIANTS}
    for rnd in range(args.rounds):
        for name, model, dtype, crossover in SPEED_VARIANTS:
            cfg = get_settings().engine_config(
                max_num_seqs=args.max_num_seqs, gptq_crossover=crossover
            )
            path = resolve_model(get_settings(), model)
            row = eb.engine_row(
                name, path, args.device, jobs, cfg, shareable, dtype, ignore_eos=args.no_eos
            )
            got[name].append((row.tps, engine_decode_tps(path, args.device, dtype, jobs, cfg)))
            say(f"round {rnd}: {name} engine {row.tps:.1f} tok/s, batch-1 {got[name][-1][1]:.1f}")
            lines.append(f"| {rnd} | {name} | {row.tps:.1f} | {got[name][-1][1]:.1f} |")
    lines.append("")
    ref = got[SPEED_VARIANTS[0][0]]
    for name, runs in list(got.items())[1:]:
        for i, what in enumerate(("engine", "batch-1 decode")):
            ratios = ", ".join(f"{q[i] / f[i]:.2f}x" for q, f in zip(runs, ref, strict=True))
            lines.append(f"- {name} / bf16 {what}, per round: {ratios}")
    found = sorted(gptq_dispatch._crossovers.items())
    lines.append(
        "- many-row path (rows from which it runs): "
        + ", ".join(f"{k}->{n}: {'fused' if f else 'dense'} {c}" for ((k, n, _), f), c in found)
    )
    gemv = sorted(f"{k}->{n}" for ((k, n, _), _), on in gptq_dispatch._gemv.items() if on)
    lines.append(
        f"- fused GEMM below {gptq_gemm.GEMV_ROWS} rows (straight from the codes): "
        + (", ".join(gemv) or "none")
    )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=None, help="default 128, or 16 with --quick")
    ap.add_argument("--quick", action="store_true", help="16 jobs, first 1024 held-out tokens")
    for flag, default in [("seed", 0), ("max-num-seqs", 128), ("max-new", 128)]:
        ap.add_argument(f"--{flag}", type=int, default=default)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    ap.add_argument("--speed", action="store_true", help="engine speed only, bf16 vs GPTQ")
    ap.add_argument("--rounds", type=int, default=2, help="--speed: alternations")
    ap.add_argument("--no-eos", action="store_true", help="--speed: every job to max_tokens")
    ap.add_argument("--measure-rss", nargs=2, metavar=("PATH", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.measure_rss:
        measure_rss(*args.measure_rss, args.device)
        return
    exe = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else "python"
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ]
    command = shlex.join([*env, exe, *sys.argv])
    args.jobs = args.jobs or (16 if args.quick else 128)
    fp_path = resolve_model(get_settings(), FP_MODEL)
    tok = AutoTokenizer.from_pretrained(fp_path)
    codec = TextCodec(tok, GenerationConfig.from_pretrained(fp_path))
    jobs, sys_lens = eb.build_workload(tok, codec, args.jobs, args.seed, args.max_new)
    shareable = eb.shareable_tokens(jobs, sys_lens)
    peak = matmul_peak_gflops(torch.device(args.device), torch.float32)
    say(f"{len(jobs)} jobs, system blocks {sys_lens}; fp32 matmul peak {peak:.1f} GFLOP/s")
    if args.speed:
        text = "\n".join([*speed_rows(args, jobs, shareable), f"- command: `{command}`"])
        print(text)
        return
    results = {v.name: run_variant(v, args, jobs, shareable) for v in VARIANTS}
    assert len({r["ntok"] for r in results.values()}) == 1, "the tokenizers differ"

    fp32, q = results[VARIANTS[0].name], results[VARIANTS[2].name]
    lines = [*table(results), ""]
    for name, r in list(results.items())[:2]:
        speed = f"engine out tok/s {out_tps(q) / out_tps(r):.2f}x"
        decode = f"decode {q['b1'] / r['b1']:.2f}x (engine {q['eb1'] / r['eb1']:.2f}x)"
        lines.append(f"- {VARIANTS[2].name} vs {name}: {speed}, {decode}")
    ref = fp32["row"].outputs
    for name, r in list(results.items())[1:]:
        same = sum(r["row"].outputs.get(s) == t for s, t in ref.items())
        lines.append(f"- engine greedy outputs identical to fp32's: {name} {same}/{len(ref)}")
    lines += [
        f"- perplexity: worker/data/heldout.txt, {fp32['ntok']} tokens, non-overlapping "
        f"{WINDOW}-token windows; GPTQ kernel picked by load_causal_lm: {q['kernel']}",
        "- disk: *.safetensors files; fp bf16 loads the fp32 files and casts; linear = q/k/v/o/"
        "gate/up/down projections (GPTQ: qweight+qzeros+scales+g_idx), rest = tied embedding "
        "+ norms (stored bf16 in the GPTQ checkpoint)",
        "- RSS: whole-process peak RSS (VmHWM) incl. Python, torch, transformers (and "
        "gptqmodel for GPTQ) of a fresh subprocess loading the model and generating 8 tokens",
        f"- engine: {len(jobs)} seeded jobs (seed {args.seed}, max_tokens 16-{args.max_new}), "
        f"paged engine with prefix cache, max_num_seqs {args.max_num_seqs}; batch-1: HF "
        f"generate, {len(jobs[0].prompt_ids)}-token prompt, 64 new tokens, greedy",
        f"- {args.device}, {torch.get_num_threads()} threads, fp32 matmul peak {peak:.1f} GFLOP/s",
        f"- command: `{command}`",
    ]
    say(f"wrote {publish(lines, args.out / 'gptq_report.md')}")


if __name__ == "__main__":
    main()
