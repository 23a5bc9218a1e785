"""The default CPU layout of ``trtpipe serve``: a worker per core for encoders only."""

from __future__ import annotations

from trtpipe.devices import Device, cpu_cores, parse_devices
from trtpipe.server.config import ServeConfig


def test_default_layout_gives_encoders_a_cpu_worker_per_core() -> None:
    config = ServeConfig(cpu_worker_per_core=True)
    assert config.encoder_devices() == [Device("cpu", i) for i in range(cpu_cores())]
    assert config.devices == [Device("cpu", 0)]  # generation models keep one worker


def test_a_given_layout_is_kept() -> None:
    assert ServeConfig().encoder_devices() == [Device("cpu", 0)]
    two = parse_devices("cpu:2")
    assert ServeConfig(devices=two, cpu_worker_per_core=True).encoder_devices() == two
    gpu = [Device("cuda", 0)]
    assert ServeConfig(devices=gpu, cpu_worker_per_core=True).encoder_devices() == gpu
