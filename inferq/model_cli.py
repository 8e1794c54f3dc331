"""`inferq model ...`: prepare the built-in models, add your own (checked), list, remove,
GPTQ-quantize a directory."""

from __future__ import annotations

import argparse
import json
import sys

from inferq.extras import missing_extra_hint
from inferq.settings import get_settings


def _prep_run(kind: str, work) -> int:
    """Run `work(view)` with our progress on the terminal and library output in a log file
    under INFERQ_HOME; print the paths it returns on stdout, one a line."""
    import time

    from worker.prep.capture import log_path_for
    from worker.prep.progress import format_duration, prep_session

    log_path = log_path_for(get_settings().home, kind)
    started = time.perf_counter()
    try:
        with prep_session(log_path) as view:
            view.line(f"inferq model {kind}: library output goes to {log_path}")
            paths = work(view)
            view.line(f"ready in {format_duration(time.perf_counter() - started)}")
    except KeyboardInterrupt:
        print(f"interrupted; log: {log_path}", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:
        hint = missing_extra_hint("model", exc.name or "")
        if hint is None:
            raise
        print(hint, file=sys.stderr)
        return 2
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"full log (traceback and library output): {log_path}", file=sys.stderr)
        return 1
    for path in paths:
        print(path)
    return 0


def _cmd_model_prepare(args: argparse.Namespace) -> int:
    from worker.prep.models import MARKER, resolve_model

    settings = get_settings()
    served = settings.served_models()

    def work(view) -> list[str]:
        paths = []
        for name in args.names or list(served):
            path = served.get(name)
            cached = path is None and (settings.models_dir / name / MARKER).is_file()
            if not cached:
                view.line(f"preparing {name}")
            paths.append(resolve_model(settings, name, path))
            view.line(f"{name}: {'cached at' if cached else 'ready at'} {paths[-1]}")
        return paths

    return _prep_run("prepare", work)


def _cmd_model_quantize(args: argparse.Namespace) -> int:
    from pathlib import Path

    from worker.prep.quantize import GptqSpec, quantize

    spec = GptqSpec(
        bits=args.bits,
        group_size=args.group_size,
        sym=args.sym,
        act_order=args.act_order,
        static_groups=args.static_groups,
        mse=args.mse,
        clip_steps=args.clip_steps,
        samples=args.samples,
        max_tokens=args.max_tokens,
        seed=args.seed,
    )

    def work(view) -> list[str]:
        quantize(Path(args.src), Path(args.dst), spec, device=args.device)
        view.line(f"quantized to {args.dst}")
        return [args.dst]

    return _prep_run("quantize", work)


def _cmd_model_add(args: argparse.Namespace) -> int:
    from worker.prep.registry import add_model

    try:
        entry = add_model(get_settings(), args.name, args.path, replace=args.replace)
    except (ValueError, MemoryError) as exc:
        print(f"inferq model add: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({args.name: entry}, indent=2))
    return 0


def _cmd_model_list(args: argparse.Namespace) -> int:
    from worker.prep.models import KNOWN_MODELS, MARKER

    settings = get_settings()
    rows = [
        {
            "name": name,
            "source": "built-in",
            "path": str(settings.models_dir / name),
            "prepared": (settings.models_dir / name / MARKER).is_file(),
        }
        for name in KNOWN_MODELS
    ]
    rows += [
        {"name": name, "source": "added", **entry}
        for name, entry in settings.registered_models().items()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        what = (
            ("prepared" if row["prepared"] else "not prepared")
            if row["source"] == "built-in"
            else f"{row['model_type']}, {row['quantization']}, {row['weights_gib']} GiB"
        )
        print(f"{row['name']}\t{row['source']}\t{what}\t{row['path']}")
    return 0


def _cmd_model_remove(args: argparse.Namespace) -> int:
    from worker.prep.registry import remove_model

    if remove_model(get_settings(), args.name):
        print(f"removed {args.name} (its directory is left as it is)")
        return 0
    print(f"inferq model remove: {args.name!r} was not added", file=sys.stderr)
    return 1


def add_parsers(verbs: argparse._SubParsersAction) -> None:
    from worker.prep.recipe import GptqSpec

    model = verbs.add_parser("model", help="model preparation")
    model_verbs = model.add_subparsers(dest="model_verb", required=True)
    prepare = model_verbs.add_parser(
        "prepare", help="download, convert and quantize models (cached); prints their paths"
    )
    prepare.add_argument("names", nargs="*", help="model names (default: the served models)")
    prepare.set_defaults(func=_cmd_model_prepare)
    add = model_verbs.add_parser(
        "add",
        help="register a local Hugging Face directory (dense or GPTQ) under a name, checked; "
        "workers then serve it as INFERQ_MODEL=NAME or NAME in INFERQ_MODELS",
    )
    add.add_argument("name", help="the name jobs give as `model`")
    add.add_argument("path", help="Hugging Face model directory")
    add.add_argument("--replace", action="store_true", help="re-point an added name")
    add.set_defaults(func=_cmd_model_add)
    listing = model_verbs.add_parser("list", help="the built-in and the added models")
    listing.add_argument("--json", action="store_true", help="as JSON")
    listing.set_defaults(func=_cmd_model_list)
    remove = model_verbs.add_parser("remove", help="forget an added model (files stay)")
    remove.add_argument("name")
    remove.set_defaults(func=_cmd_model_remove)
    quant = model_verbs.add_parser("quantize", help="GPTQ-quantize a Hugging Face model dir")
    quant.add_argument("src", help="Hugging Face model directory")
    quant.add_argument("dst", help="output directory (replaced when done)")
    spec = GptqSpec()
    quant.add_argument(
        "--bits", type=int, default=spec.bits, choices=[2, 3, 4, 8], help="bits per weight"
    )
    quant.add_argument(
        "--group-size", type=int, help="default: 32 where it divides hidden/intermediate sizes"
    )
    quant.add_argument(
        "--sym", action=argparse.BooleanOptionalAction, default=spec.sym, help="symmetric groups"
    )
    quant.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=spec.act_order,
        help="GPTQ desc_act",
    )
    quant.add_argument(
        "--static-groups",
        action=argparse.BooleanOptionalAction,
        default=spec.static_groups,
        help="act-order with fixed, consecutive groups",
    )
    quant.add_argument("--mse", type=float, default=spec.mse, help="clipping search norm; 0: off")
    quant.add_argument(
        "--clip-steps", type=int, default=spec.clip_steps, help="clipping ranges tried (80: all)"
    )
    quant.add_argument("--samples", type=int, default=spec.samples, help="calibration texts")
    quant.add_argument(
        "--max-tokens", type=int, default=spec.max_tokens, help="cut texts to N tokens; 0: whole"
    )
    quant.add_argument("--seed", type=int, default=spec.seed, help="calibration sampling seed")
    quant.add_argument("--device", default="auto", help="cpu, cuda or auto")
    quant.set_defaults(func=_cmd_model_quantize)
