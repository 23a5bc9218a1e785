"""Which client the served bench speaks gRPC with: its own zttp channel where zttp is installed
(Python 3.11+), tritonclient's otherwise or when asked."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from trtpipe.bench.served_clients import grpc_client_name
from trtpipe.errors import InputError


def test_auto_takes_the_zttp_channel_where_zttp_is_installed() -> None:
    expected = "zttp" if importlib.util.find_spec("zttp") else "tritonclient"
    assert grpc_client_name("auto") == expected
    assert grpc_client_name("tritonclient") == "tritonclient"
    with pytest.raises(InputError, match="unknown gRPC client 'grpcio'; choose auto, zttp"):
        grpc_client_name("grpcio")


def test_without_zttp_auto_falls_back_and_an_explicit_zttp_says_why(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "zttp", None)  # as on Python 3.10: import zttp fails
    assert grpc_client_name("auto") == "tritonclient"
    with pytest.raises(InputError, match=r"needs zttp \(Python 3.11\+\); use --grpc-client trit"):
        grpc_client_name("zttp")
