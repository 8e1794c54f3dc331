"""The C kernels compile for each x86 CPU kind the engine meets (AVX2, AVX-512 without BF16,
AVX-512 BF16 + VNNI, AMX), whatever CPU runs the test: a kind-specific path that does not
compile would leave that kind on the slow torch path with every native test skipped."""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from worker.engine import native

CC = shutil.which("cc") or shutil.which("gcc")
TARGETS = ["x86-64-v3", "skylake-avx512", "cooperlake", "sapphirerapids"]


@pytest.mark.skipif(CC is None, reason="no C compiler here")
@pytest.mark.parametrize("march", TARGETS)
def test_kernels_compile_for(march: str, tmp_path: Path) -> None:
    flags = [f for f in native.FLAGS if f not in ("-march=native", "-O3", "-shared")]
    for source in native.SOURCES:
        run = subprocess.run(
            [
                CC,
                f"-march={march}",
                "-O0",
                *flags,
                "-Wall",
                "-Werror",
                "-c",
                str(source),
                "-o",
                str(tmp_path / f"{source.stem}.o"),
            ],
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, f"{source.name} for {march}:\n{run.stderr[-3000:]}"


@pytest.mark.skipif(CC is None, reason="no C compiler here")
def test_library_builds_here() -> None:
    assert native.library() is not None


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="not glibc")
def test_keep_heap_takes_on_glibc() -> None:
    assert native.keep_heap()
