"""``require_visible`` names why no GPU is usable (strict fake CUDA runtime), not only "no GPU"."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.install import FakeGpu, installed_fakes
from trtpipe.devices import Device, require_visible
from trtpipe.errors import BackendUnavailableError


@pytest.fixture
def fake_gpu() -> Iterator[FakeGpu]:
    with installed_fakes() as handle:
        yield handle


def refusal(device: Device) -> str:
    with pytest.raises(BackendUnavailableError) as info:
        require_visible(device)
    return str(info.value)


def test_driver_older_than_cuda_python_is_named(fake_gpu: FakeGpu):
    fake_gpu.state.driver_version = 12040  # cuda-python 13 on a CUDA 12.4 driver
    message = refusal(Device("cuda", 0))
    assert message.startswith("cuda:0 requested but no CUDA GPU is usable here: ")
    assert "cudaErrorInsufficientDriver" in message
    assert "the NVIDIA driver supports CUDA 12.4" in message
    assert "pip install 'trtpipe[gpu-cu12]'" in message


def test_no_device_and_a_missing_index(fake_gpu: FakeGpu):
    fake_gpu.state.device_count = 0
    message = refusal(Device("cuda", 0))
    assert "no CUDA GPU is usable here: cudaErrorNoDevice" in message
    fake_gpu.state.device_count = 2
    require_visible(Device("cuda", 1))  # present: no error
    assert "only 2 CUDA GPU(s) are visible (cuda:0..cuda:1)" in refusal(Device("cuda", 2))
    require_visible(Device("cpu", 0))  # the CPU needs no GPU
