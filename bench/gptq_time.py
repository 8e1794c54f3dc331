"""Where the default model's GPTQ quantization spends its time, and what a recipe costs in
held-out perplexity: one row per quantization, recipes alternated on the shared CPU.

Usage: .venv/bin/python bench/gptq_time.py [--recipes today,default] [--rounds 2]
       .venv/bin/python bench/gptq_time.py --recipe fast:samples=128,mse=0 --recipes today,fast
Each row quantizes the fp model (FP_MODEL, prepared as usual) with `worker.prep.quantize` into a
temporary directory (never the cache), then measures perplexity on worker/data/heldout.txt as
bench/gptq_report.py does. Time columns: wall = the whole `quantize()` call (import excluded:
gptqmodel is imported once before the first row), CPU = this process's CPU seconds in it (all
threads: steadier than wall on a shared machine); then gptqmodel's own region timer (summed
over modules and layers; its threads can overlap): calibration forwards (input capture, the
forwards that feed each subset's Hessians and the post-quantization replay), GPTQ = its
per-module quantize (Hessian inverse, column loop, the clipping search), of which the clipping
search (`Quantizer.find_params`, timed here) and the Hessian inverse with its damping search,
pack = packing into int4, save. Recipes: `today` = the recipe and code before this script's
change (320 whole samples, clipping search 2.4 in gptqmodel's loop), `default` = what
`inferq model prepare` uses now; `--recipe NAME:field=value,...` adds one (fields of
GptqSpec; these and `default` use worker/prep/clipping.py's batched search).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import torch
from gptq_report import HELDOUT, perplexity, publish  # bench/gptq_report.py, beside this script
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from inferq.settings import DEFAULT_MODEL, FP_MODEL, get_settings
from worker.engine.loading import import_gptqmodel, load_causal_lm
from worker.prep import clipping
from worker.prep import quantize as quantize_module
from worker.prep.models import KNOWN_MODELS, resolve_model
from worker.prep.progress import format_duration
from worker.prep.quantize import quantize
from worker.prep.recipe import GptqSpec

TODAY = GptqSpec(group_size=32, samples=320, mse=2.4, clip_steps=80, max_tokens=0)
OWN_SEARCH = {"today"}  # recipes quantized with gptqmodel's clipping search loop
REGIONS = {  # our column: gptqmodel region names summed into it
    "forwards": ("capture_inputs", "pre_quant_forward", "post_quant_forward", "forward_hook"),
    "GPTQ": ("process_quant",),
    "Hessian inverse": ("hessian_inverse",),
    "pack": ("submodule_finalize_pack", "submodule_finalize_create", "process_finalize"),
    "save": ("model_save",),
}


class Clock:
    """Seconds spent inside wrapped callables, summed across threads."""

    def __init__(self) -> None:
        self.total = 0.0
        self.lock = threading.Lock()

    def wrap(self, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with self.lock:
                    self.total += time.perf_counter() - started

        return timed


def parse_recipe(text: str) -> tuple[str, GptqSpec]:
    name, _, body = text.partition(":")
    types = {f.name: f.type for f in fields(GptqSpec)}
    values = {}
    for item in filter(None, body.split(",")):
        key, _, raw = item.partition("=")
        kind = types[key]
        values[key] = raw.lower() in ("1", "true", "yes") if "bool" in kind else float(raw)
        if "int" in kind and "bool" not in kind:
            values[key] = int(values[key])
    return name, replace(KNOWN_MODELS[DEFAULT_MODEL].spec, **values)


def quantize_timed(
    gptqmodel, src: Path, dst: Path, spec: GptqSpec, own_search: bool
) -> dict[str, float]:
    """Quantize `src` into `dst` with `spec` (`own_search`: gptqmodel's clipping search loop,
    not worker.prep.clipping's); the wall time and the regions, in seconds."""
    from gptqmodel.quantization.quantizer import Quantizer

    captured = {}
    load = gptqmodel.GPTQModel.load

    def capturing_load(*args, **kwargs):
        captured["model"] = load(*args, **kwargs)
        return captured["model"]

    search, theirs, ours = Clock(), Quantizer.find_params, clipping.find_params
    fast = quantize_module.fast_clipping_search
    gptqmodel.GPTQModel.load = capturing_load
    if own_search:
        Quantizer.find_params = search.wrap(theirs)
        quantize_module.fast_clipping_search = contextlib.nullcontext
    else:
        clipping.find_params = search.wrap(ours)  # what fast_clipping_search swaps in
    started, cpu = time.perf_counter(), time.process_time()
    try:
        quantize(src, dst, spec, device="cpu", say=lambda _msg: None)
    finally:
        gptqmodel.GPTQModel.load = load
        Quantizer.find_params, clipping.find_params = theirs, ours
        quantize_module.fast_clipping_search = fast
    row = {"wall": time.perf_counter() - started, "CPU": time.process_time() - cpu}
    stats = captured["model"].quant_region_timer._stats
    for column, names in REGIONS.items():
        row[column] = sum(float(stats.get(n, {}).get("total", 0.0)) for n in names)
    row["clipping search"] = search.total
    return row


def load_average() -> str:
    return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipes", default="today,default", help="comma-separated, alternated")
    ap.add_argument("--recipe", action="append", default=[], help="NAME:field=value,...")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("bench/out"))
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    recipes = {"today": TODAY, "default": KNOWN_MODELS[DEFAULT_MODEL].spec}
    recipes.update(parse_recipe(r) for r in args.recipe)
    order = args.recipes.split(",")
    src = Path(resolve_model(get_settings(), FP_MODEL))
    ids = AutoTokenizer.from_pretrained(src)(HELDOUT.read_text())["input_ids"]
    gptqmodel = import_gptqmodel()
    columns = ["wall", "CPU", *REGIONS, "clipping search"]
    lines = [
        f"| round | recipe | {' | '.join(c + ' s' for c in columns)} | perplexity | load |",
        "|---" * (len(columns) + 4) + "|",
    ]
    work = Path(tempfile.mkdtemp(prefix="gptq-time-"))
    try:
        for rnd in range(1, args.rounds + 1):
            for name in order:
                dst = work / name
                row = quantize_timed(gptqmodel, src, dst, recipes[name], name in OWN_SEARCH)
                loaded = load_causal_lm(str(dst), torch.device("cpu"), "auto")
                ppl = perplexity(loaded.model, ids)
                del loaded
                gc.collect()
                shutil.rmtree(dst)
                cells = " | ".join(f"{row[c]:.1f}" for c in columns)
                lines.append(f"| {rnd} | {name} | {cells} | {ppl:.2f} | {load_average()} |")
                print(lines[-1], file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()
    lines += [f"- recipe {name}: {asdict(recipes[name])}" for name in order]
    lines += [
        f"- commit {commit}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
        f"run took {format_duration(time.perf_counter() - STARTED)}; load = 1/5/15-min averages "
        "after the row",
        f"- command: `{' '.join(sys.argv)}`",
    ]
    publish(lines, args.out / "gptq_time.md")


STARTED = time.perf_counter()

if __name__ == "__main__":
    main()
