import json
from pathlib import Path
from typing import Any

import pytest

from trtpipe.devices import Device, parse_devices, parse_gpus
from trtpipe.engine import (
    EngineDir,
    Manifest,
    ShapeRange,
    TensorSpec,
    atomic_directory,
    write_manifest,
)
from trtpipe.errors import EngineMismatchError, InputError


def manifest() -> Manifest:
    return Manifest(
        task="feature-extraction",
        backend="onnxruntime",
        precision="fp32",
        engine_file="model.ort.onnx",
        inputs=[TensorSpec("input_ids", "int64", [-1, -1], ["batch", "sequence"])],
        outputs=[TensorSpec("h", "float32", [-1, -1, 8], ["batch", "sequence", ""])],
        profile={"input_ids": ShapeRange([1, 1], [4, 16], [8, 64])},
    )


def test_manifest_round_trip(tmp_path: Path):
    write_manifest(tmp_path, manifest())
    (tmp_path / "model.ort.onnx").write_bytes(b"x")
    engine = EngineDir(tmp_path)
    assert engine.manifest == manifest()
    assert engine.manifest.max_batch_size == 8
    assert engine.manifest.profile["input_ids"].contains((8, 64))
    assert not engine.manifest.profile["input_ids"].contains((9, 1))


def test_newer_format_is_refused(tmp_path: Path):
    data = manifest().to_dict()
    data["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    (tmp_path / "model.ort.onnx").write_bytes(b"x")
    with pytest.raises(EngineMismatchError, match="rebuild"):
        EngineDir(tmp_path)


def test_missing_engine_file(tmp_path: Path):
    write_manifest(tmp_path, manifest())
    with pytest.raises(InputError, match=r"model\.ort\.onnx is missing"):
        EngineDir(tmp_path)


def test_atomic_directory_failure_keeps_old(tmp_path: Path):
    final = tmp_path / "engine"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(final) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("build failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]
    assert (final / "old.txt").read_text() == "old"
    with atomic_directory(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]


def test_device_parsing():
    assert parse_devices("cpu:2") == [Device("cpu", 0), Device("cpu", 1)]
    assert parse_devices("cuda:0,cuda:1") == [Device("cuda", 0), Device("cuda", 1)]
    assert parse_gpus("0,1") == [Device("cuda", 0), Device("cuda", 1)]
    for bad in ("cpu:0", "cpu:x", "tpu:1"):
        with pytest.raises(InputError):
            parse_devices(bad)
    with pytest.raises(InputError, match="twice"):
        parse_gpus("1,1")


def test_a_signal_right_after_the_temp_dir_is_made_still_removes_it(tmp_path, monkeypatch):
    """The signal handler (remove_partial_dirs, then exit) can run between any two lines: the
    temp dir must be known to it from the moment it exists (a SIGTERM in that gap left it)."""
    from trtpipe import engine

    class Killed(BaseException):
        pass

    made: list[Path] = []
    real_mkdir = Path.mkdir

    def mkdir_then_signal(self: Path, *args: Any, **kwargs: Any) -> None:
        real_mkdir(self, *args, **kwargs)
        if self.name.startswith(".out.tmp-"):
            made.append(self)
            engine.remove_partial_dirs()  # what the handler does before os._exit
            raise Killed

    monkeypatch.setattr(Path, "mkdir", mkdir_then_signal)
    with pytest.raises(Killed), engine.atomic_directory(tmp_path / "out"):
        pytest.fail("the block must not run")
    assert made and list(tmp_path.iterdir()) == []
