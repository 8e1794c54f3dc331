"""Every supported decoder family, token-exact against transformers' own greedy `generate`
(eager attention, fp32) on tiny random-weight models built offline (tests/engine/tiny_models):
a batch cold, the same batch again on a warm prefix cache, and each prompt alone in 16-token
prefill chunks; on the C-kernel path (the lean forward where the family has one) and on the
torch path. Prompts run past the sliding window of the windowed families."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import transformers

from inferq.params import EngineConfig
from tests.engine.tiny_models import FAMILIES, VOCAB, WINDOW, build, config, reference, save
from worker.engine import families, native
from worker.engine.api import EngineRequest, SamplingParams, run_to_completion
from worker.engine.engine import PagedEngine

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_TOKENS = 12
#: families the lean forward runs (on CPU, where the C kernels build)
LEAN = {"llama", "llama3.1", "mistral", "qwen2", "qwen3", "gemma", "gemma3"}


def _prompts() -> list[list[int]]:
    """Three prompts sharing a 40-token prefix (2.5 blocks, past the window), three apart."""
    rng = random.Random(11)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    shared = ids(40)
    return [shared + ids(n) for n in (5, 12, 30)] + [ids(n) for n in (7, 23, 64)]


PROMPTS = _prompts()
assert max(map(len, PROMPTS)) > 2 * WINDOW


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("families")


_REFS: dict[str, list[list[int]]] = {}


def _model(family: str, root: Path) -> tuple[str, list[list[int]]]:
    path = build(family, root)
    if family not in _REFS:
        _REFS[family] = reference(path, PROMPTS, MAX_TOKENS)
    return str(path), _REFS[family]


def _requests(tag: str, indices: list[int], tenant: str = "t") -> list[EngineRequest]:
    greedy = SamplingParams(max_tokens=MAX_TOKENS)
    return [
        EngineRequest(seq_id=f"{tag}-{i}", prompt_ids=PROMPTS[i], params=greedy, tenant=tenant)
        for i in indices
    ]


def _engine(path: str, *, use_native: bool, chunk: int = 256) -> PagedEngine:
    config = EngineConfig(native=use_native, kv_cache_tokens=2048, prefill_chunk_tokens=chunk)
    return PagedEngine(path, "tiny", device="cpu", dtype="float32", config=config)


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_token_exact(family: str, use_native: bool, root: Path) -> None:
    path, refs = _model(family, root)
    for ref in refs:  # random weights, yet not one repeated token
        assert len(set(ref)) >= 4, ref
    everything = list(range(len(PROMPTS)))

    engine = _engine(path, use_native=use_native)
    if use_native and native.library() is not None:
        assert (engine.runner.lean is not None) == (family in LEAN)
    cold = run_to_completion(engine, _requests("cold", everything))
    assert [o.token_ids for o in cold] == refs
    assert sum(o.cached_tokens for o in cold) > 0  # the shared prefix
    warm = run_to_completion(engine, _requests("warm", everything))
    assert [o.token_ids for o in warm] == refs
    assert all(o.cached_tokens >= 16 for o, p in zip(warm, PROMPTS, strict=True) if len(p) > 16)

    chunked = _engine(path, use_native=use_native, chunk=16)
    for i in everything:
        (alone,) = run_to_completion(chunked, _requests("alone", [i], tenant=f"solo{i}"))
        assert alone.token_ids == refs[i], i


def test_every_allowed_family_is_in_the_matrix() -> None:
    assert {config(f).model_type for f in FAMILIES} == set(families.FAMILIES)


def test_an_untested_family_is_refused_at_load_naming_its_architecture(tmp_path: Path) -> None:
    cfg = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    save(cfg, tmp_path / "neox")
    with pytest.raises(families.UnsupportedModelError, match="'gpt_neox' \\(GPTNeoXForCausalLM\\)"):
        _engine(str(tmp_path / "neox"), use_native=True)
