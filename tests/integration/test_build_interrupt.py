"""An interrupted ``build --int8`` / ``--fp16`` leaves no file behind, in the output's folder or
the temp dir: the precision step's scratch files live inside the build's atomic temp dir."""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from trtpipe.build import BuildConfig, build_engine_dir


class Exited(BaseException):
    """What the fake ``os._exit`` raises, so the test regains control."""


def files_under(*roots: Path) -> list[str]:
    return sorted(str(p) for root in roots for p in root.rglob("*") if p.is_file())


@pytest.fixture()
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """(the process's temp dir, the output's parent), both empty and watched."""
    system_tmp, out = tmp_path / "system-tmp", tmp_path / "out"
    system_tmp.mkdir()
    out.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    return system_tmp, out


# The step the interruption lands in, once the precision's intermediate files exist.
STEPS = {
    "int8": ("trtpipe.int8_selection.select_fp32_nodes", {"fused.onnx", "all_int8.onnx"}),
    "fp16": ("modelopt.onnx.autocast.convert_to_mixed_precision", {"calib.npz"}),
}


def interrupt_in_step(
    precision: str, monkeypatch: pytest.MonkeyPatch, interrupt: Callable[[], None]
) -> list[set[str]]:
    """Make ``precision``'s step record the scratch files it sees, then call ``interrupt``."""
    target, _ = STEPS[precision]
    seen: list[set[str]] = []

    def step(*args: Any, **kwargs: Any) -> Any:
        seen.append({Path(p).name for p in files_under(*WATCHED)})
        interrupt()
        raise AssertionError("interrupt() returned")

    monkeypatch.setattr(target, step)
    return seen


WATCHED: list[Path] = []


def build(onnx_path: Path, out: Path, precision: str) -> None:
    build_engine_dir(
        BuildConfig(
            onnx_path=onnx_path,
            output=out / "engine",
            precision=precision,
            backend="onnxruntime",
            max_shapes={"input_ids": [8, 64]},
        )
    )


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_signal_during_precision_removes_everything(
    precision: str,
    tiny_bert_onnx: Path,
    folders: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ctrl-C / SIGTERM through the CLI's handler: it removes the build's temp dir and calls
    ``os._exit``, so no ``finally`` or ``with`` block gets to clean up after it."""
    from trtpipe.cli import main as cli_main

    system_tmp, out = folders
    WATCHED[:] = [system_tmp, out]
    left_at_exit: list[list[str]] = []

    def fake_exit(code: int) -> None:
        left_at_exit.append(files_under(system_tmp, out))
        raise Exited(code)

    monkeypatch.setattr(os, "_exit", fake_exit)
    seen = interrupt_in_step(
        precision, monkeypatch, lambda: cli_main._on_signal(signal.SIGTERM, None)
    )
    with pytest.raises(Exited):
        build(tiny_bert_onnx, out, precision)
    # The interruption came while the scratch files existed...
    assert seen and STEPS[precision][1] <= seen[0]
    # ...and at the moment the process would have exited, none was left anywhere.
    assert left_at_exit == [[]]


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_keyboard_interrupt_during_precision_removes_everything(
    precision: str,
    tiny_bert_onnx: Path,
    folders: tuple[Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    system_tmp, out = folders
    WATCHED[:] = [system_tmp, out]

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    seen = interrupt_in_step(precision, monkeypatch, ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_bert_onnx, out, precision)
    assert seen and STEPS[precision][1] <= seen[0]
    assert files_under(system_tmp, out) == []
    assert list(out.iterdir()) == [] and list(system_tmp.iterdir()) == []
