"""Stage planning without a model: block names, byte balancing, --stage-layers parsing."""

from __future__ import annotations

import pytest

from trtpipe.build.stages import balance_by_bytes, block_index, parse_stage_layers
from trtpipe.errors import InputError


@pytest.mark.parametrize(
    "name, index",
    [
        ("/0/encoder/layer.3/attention/self/MatMul", 3),
        ("/model/layers.11/self_attn/q_proj/MatMul", 11),
        ("/transformer/h.0/attn/c_attn/MatMul", 0),
        ("/0/embeddings/LayerNorm/LayerNormalization", None),
        ("/model/layers_norm/Mul", None),
        ("Constant_332", None),
    ],
)
def test_block_index(name: str, index: int | None):
    assert block_index(name) == index


def test_balance_equal_blocks_gives_equal_stages():
    assert balance_by_bytes(0, [1] * 6, 0, 3) == [(0, 1), (2, 3), (4, 5)]
    assert balance_by_bytes(0, [1] * 32, 0, 4) == [(0, 7), (8, 15), (16, 23), (24, 31)]


def test_balance_counts_embeddings_and_head():
    # all-MiniLM-L6-v2: a 47.7 MB embedding table before six 7.1 MB blocks.
    assert balance_by_bytes(47_674_368, [7_097_856] * 6, 0, 2) == [(0, 0), (1, 5)]
    # A large head (an untied LM head) pulls blocks towards the first stage.
    assert balance_by_bytes(0, [10] * 8, 40, 2) == [(0, 5), (6, 7)]


def test_balance_refuses_more_stages_than_blocks():
    with pytest.raises(InputError, match="the model has 6 blocks"):
        balance_by_bytes(0, [1] * 6, 0, 7)


def test_parse_stage_layers():
    assert parse_stage_layers("0-2,3-5", 6) == [(0, 2), (3, 5)]
    assert parse_stage_layers("0, 1-4, 5", 6) == [(0, 0), (1, 4), (5, 5)]
    for bad, message in (
        ("0-2,4-5", "should start at 3"),
        ("0-2", "covers 3 blocks, the model has 6"),
        ("0-x", "bad --stage-layers"),
        ("3-5,0-2", "should start at 0"),
    ):
        with pytest.raises(InputError, match=message):
            parse_stage_layers(bad, 6)
