"""scripts/check_cuda_runtime.py where no GPU is usable: the reason in one line, exit 2."""

from __future__ import annotations

import pytest

from tests.scripts import run_script
from trtpipe import cuda


def test_without_a_usable_gpu_the_check_says_why_and_exits_2() -> None:
    reason = cuda.unusable_reason()
    if reason is None:
        pytest.skip("a GPU is usable here: run the script itself, it checks it for real")
    result = run_script("check_cuda_runtime.py", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"no usable GPU: {reason}"
    assert result.stdout == ""
