"""The engine's C kernels (csrc/), compiled on first use with the machine's C compiler and
cached per source, compiler and CPU; called through ctypes on tensors' raw pointers.

No torch C++ headers, no pybind: a build takes about a second. Without a compiler (or on
any build failure) `library()` returns None and callers keep their torch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCES = sorted((Path(__file__).with_name("csrc")).glob("*.c"))
HEADERS = sorted((Path(__file__).with_name("csrc")).glob("*.h"))  # in the cache key too
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared"]
log = logging.getLogger(__name__)


_kernel_dir: list[str] = []  # set once per process by `configure`


def configure(kernel_dir: str | None) -> None:
    """Where the kernels are built, from the engine's config (the service: INFERQ_HOME/kernels);
    the first engine of a process decides (one library per process)."""
    if kernel_dir and not _kernel_dir:
        _kernel_dir.append(kernel_dir)


def cache_dir() -> Path:
    """The configured kernel directory, else XDG_CACHE_HOME (or ~/.cache)/inferq/kernels."""
    if _kernel_dir:
        return Path(_kernel_dir[0])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "inferq" / "kernels"


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(
            [compiler, *FLAGS, *map(str, SOURCES), "-o", str(built), "-lm"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        os.replace(built, target)  # atomic: concurrent builders each install a whole file


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built or loaded here."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.warning("no C compiler: the engine uses its torch attention path")
        return None
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
        key = hashlib.sha256(
            "\0".join(
                [
                    *(p.read_text() for p in SOURCES + HEADERS),
                    " ".join(FLAGS),
                    version,
                    _cpu_flags(),
                ]
            ).encode()
        ).hexdigest()[:16]
        target = cache_dir() / f"inferq_kernels_{key}.so"
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))  # torch is loaded first: one OpenMP runtime
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("C kernels unavailable (%s): the engine uses its torch attention path", exc)
        return None
    fn = lib.inferq_paged_attention
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr]
    fn.argtypes += [ptr]
    fn.argtypes += [ptr, ptr, i64, i64, i64, i64, i64, ctypes.c_float, ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    lib.inferq_paged_attention_supports.argtypes = [i64, i64, i64]
    cint, f32 = ctypes.c_int, ctypes.c_float
    lib.inferq_add_rmsnorm.argtypes = [ptr, ptr, ptr, ptr, i64, i64, f32, cint, cint]
    lib.inferq_rotary.argtypes = [ptr, i64, ptr, ptr, i64, i64, i64, cint, cint]
    lib.inferq_silu_mul.argtypes = [ptr, ptr, i64, i64, cint, cint]
    lib.inferq_dequant_int4.argtypes = [ptr] * 4 + [i64] * 8
    lib.inferq_dequant_int4.restype = None
    lib.inferq_gemm_int4.argtypes = [ptr, i64, ptr, i64, ptr, ptr, ptr, ptr] + [i64] * 5
    lib.inferq_gemm_int4.argtypes += [cint, cint]
    lib.inferq_gemm_int4.restype = cint
    lib.inferq_gemm_int4_supports.argtypes = [i64]
    lib.inferq_kv_write.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, i64, i64, i64, cint]
    lib.inferq_kv_write.restype = None
    lib.inferq_gather_columns.argtypes = [ptr, i64, ptr, ptr, i64, i64, cint]
    lib.inferq_gather_columns.restype = None
    return lib


def supports(
    dtype: torch.dtype, device: torch.device, head_dim: int, group: int, block_size: int
) -> bool:
    """Whether the C attention kernel runs this dtype, device and attention shape (query
    heads per kv head = `group`) here."""
    if device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16):
        return False
    lib = library()
    return lib is not None and bool(
        lib.inferq_paged_attention_supports(head_dim, group, block_size)
    )


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
HEAP_KEEP = 1 << 30  # freed heap kept up to this much before glibc returns it to the OS
MMAP_FROM = 32 << 20  # blocks from this size are mmap'd (glibc's largest setting)


@functools.cache
def keep_heap() -> bool:
    """Let glibc keep freed memory for the next step: by default it unmaps big blocks on free
    and trims the heap, so a step's activation tensors come back as fresh pages the kernel
    zeroes (about 7% of a bf16 engine run on 2 cores). Process-wide, once; False where the C
    library has no mallopt (not glibc). The runner calls it unless EngineConfig.keep_heap is off."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_FROM) and mallopt(M_TRIM_THRESHOLD, HEAP_KEEP))


def _lib() -> ctypes.CDLL:
    lib = library()
    assert lib is not None, "C kernels unavailable"
    return lib


TILE_ROWS = 64  # most tokens in one tile (csrc/paged_attention.c)


@dataclass
class TokenTables:
    """A step as the C kernel sees it (int32 tensors). Token t attends to the first
    `ctx_len[t]` positions of the sequence whose block table is row `seq_of[t]` of `tables`.
    Tile i: the `tile_rows[i]` tokens from `tile_first[i]` all see the first `tile_keys[i]`
    keys of row `tile_seq[i]` and score them together; `key_from[t]` is where token t goes on
    alone. With `key_lo` (a sliding window; no tiles) token t sees keys [key_lo[t], ctx_len[t])."""

    tables: torch.Tensor  # [seqs, max_blocks]
    seq_of: torch.Tensor  # [T]
    ctx_len: torch.Tensor  # [T]
    key_from: torch.Tensor  # [T]
    tile_first: torch.Tensor  # [tiles]
    tile_rows: torch.Tensor  # [tiles], each <= TILE_ROWS
    tile_seq: torch.Tensor  # [tiles]
    tile_keys: torch.Tensor  # [tiles]
    key_lo: torch.Tensor | None = None  # [T]

    def windowed(self, window: int) -> TokenTables:
        """The same step where each token sees only its last `window` keys (itself included),
        as transformers' sliding-window layers do: no tiles (rows no longer share keys)."""
        none = self.tile_seq[:0]
        lo = (self.ctx_len - window).clamp_(min=0)
        zero = torch.zeros_like(self.key_from)
        return TokenTables(self.tables, self.seq_of, self.ctx_len, zero, none, none, none, none, lo)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    step: TokenTables,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [T, heads, d] (any strides over T and heads, unit stride over d); k_cache, v_cache
    [kv_heads, slots, d] contiguous. Returns [T, heads, d]."""
    tokens, heads, dim = q.shape
    kv_heads, slots = k_cache.shape[0], k_cache.shape[1]
    assert q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert q.dtype == k_cache.dtype == v_cache.dtype
    tiles = step.tile_seq.shape[0]
    state = torch.empty(tokens * heads * (dim + 2) if tiles else 0, dtype=torch.float32)
    out = torch.empty(tokens, heads, dim, dtype=q.dtype)
    rc = _lib().inferq_paged_attention(
        q.data_ptr(),
        q.stride(0),
        q.stride(1),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slots,
        step.tables.data_ptr(),
        step.tables.shape[1],
        step.seq_of.data_ptr(),
        step.ctx_len.data_ptr(),
        step.key_from.data_ptr(),
        None if step.key_lo is None else step.key_lo.data_ptr(),
        tiles,
        step.tile_first.data_ptr(),
        step.tile_rows.data_ptr(),
        step.tile_seq.data_ptr(),
        step.tile_keys.data_ptr(),
        state.data_ptr(),
        out.data_ptr(),
        tokens,
        heads,
        kv_heads,
        dim,
        block_size,
        scale,
        int(q.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    if rc != 0:
        raise ValueError(f"attention shape past the C kernel's limits: {tuple(q.shape)}")
    return out


def add_rmsnorm(
    x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """residual += x (in place, when x is given); returns rmsnorm(residual) * weight. All
    [T, width] contiguous of one dtype (weight [width])."""
    out = torch.empty_like(residual)
    rows, width = residual.shape
    _lib().inferq_add_rmsnorm(
        None if x is None else x.data_ptr(),
        residual.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        rows,
        width,
        eps,
        int(residual.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    return out


def kv_write(
    qkv: torch.Tensor,
    at: tuple[int, int],
    rows: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
) -> None:
    """Each token's K and V (columns at[0] and at[1] onwards of qkv [T, width], kv heads side
    by side) into rows `rows` (int64 [kv_heads * T], head-major) of the caches [kv_heads,
    slots, d]: one pass, no index_copy of transposed copies."""
    kv_heads, _, dim = k_cache.shape
    assert qkv.stride(1) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert rows.dtype == torch.int64 and rows.is_contiguous() and qkv.dtype == k_cache.dtype
    assert rows.numel() == kv_heads * qkv.shape[0]
    _lib().inferq_kv_write(
        qkv.data_ptr(),
        qkv.stride(0),
        at[0],
        at[1],
        rows.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        qkv.shape[0],
        kv_heads,
        dim,
        qkv.element_size(),
        torch.get_num_threads(),
    )


def rotary(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotary embedding, in place, on the first `heads` heads of each row of x [T, width]
    (unit stride in a row); cos, sin [T, head_dim] contiguous, x's dtype."""
    rows, dim = cos.shape
    _lib().inferq_rotary(
        x.data_ptr(),
        x.stride(0),
        cos.data_ptr(),
        sin.data_ptr(),
        rows,
        heads,
        dim,
        int(x.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of a fused [T, 2 * I] gate/up projection: [T, I]."""
    rows, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, width, dtype=gate_up.dtype)
    _lib().inferq_silu_mul(
        gate_up.data_ptr(),
        out.data_ptr(),
        rows,
        width,
        int(gate_up.dtype == torch.bfloat16),
        torch.get_num_threads(),
    )
    return out
