"""trtpipe.deploy.ray without a Ray cluster: options, the Serve builder's args, CLI errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from trtpipe.cli.main import cli
from trtpipe.deploy.ray import RayOptions, app, ray_available
from trtpipe.errors import InputError


def test_options_are_checked() -> None:
    with pytest.raises(InputError, match="at least one ENGINE_DIR"):
        RayOptions(engines=[])
    with pytest.raises(InputError, match="--replicas must be >= 1"):
        RayOptions(engines=["e"], replicas=0)
    with pytest.raises(InputError, match="needs engines="):
        app({"replicas": 2})


def test_serve_cli_ray_options() -> None:
    result = CliRunner().invoke(cli, ["serve", "some_dir", "--replicas", "2"])
    assert result.exit_code == 2 and "--replicas applies to --ray only" in result.output


@pytest.mark.skipif(ray_available(), reason="checks the message shown without ray")
def test_ray_missing_is_one_error_line(tmp_path) -> None:
    result = CliRunner().invoke(cli, ["serve", str(tmp_path), "--ray"])
    assert result.exit_code == 2
    assert result.output.count("error:") == 1 and "pip install 'trtpipe[ray]'" in result.output
