"""The CLI's defaults are the library's (one place each) and its --help names them."""

from __future__ import annotations

import dataclasses

from inferq.cli import _show_defaults, build_parser
from inferq.params import SamplingParams
from worker.prep.recipe import GptqSpec


def _parser():
    parser = build_parser()
    _show_defaults(parser)
    return parser


def test_submit_has_every_sampling_parameter_with_the_wire_defaults() -> None:
    args = _parser().parse_args(["submit", "hi"])
    defaults = SamplingParams()
    for name in ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop"):
        assert getattr(args, name) == (
            list(defaults.stop) if name == "stop" else getattr(defaults, name)
        ), name
    args = _parser().parse_args(["submit", "hi", "--ttl", "30", "--top-k", "5", "--top-p", ".9"])
    assert (args.ttl, args.top_k, args.top_p) == (30.0, 5, 0.9)


def test_quantize_defaults_to_the_recipe_model_prepare_uses() -> None:
    args = _parser().parse_args(["model", "quantize", "src", "dst"])
    spec = GptqSpec()
    for field in ("bits", "sym", "act_order", "static_groups", "mse", "samples", "seed"):
        assert getattr(args, field) == getattr(spec, field), field
    assert (spec.sym, spec.static_groups) == (False, True)  # asymmetric, static groups
    assert dataclasses.replace(spec, group_size=32) == GptqSpec(group_size=32)


def test_help_names_the_defaults() -> None:
    parser = _parser()
    verbs = next(a for a in parser._actions if a.choices and "submit" in a.choices)
    text = verbs.choices["submit"].format_help()
    assert "(default: 64)" in text and "(default: 300.0)" in text
    quant = verbs.choices["model"]._actions[-1].choices["quantize"].format_help()
    assert "(default: 2.4)" in quant and "(default: False)" in quant
