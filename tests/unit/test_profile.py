import pytest

from trtpipe.build.profile import build_profile, dim_kind, parse_shapes
from trtpipe.engine import TensorSpec
from trtpipe.errors import InputError

INPUTS = [
    TensorSpec("input_ids", "int64", [-1, -1], ["batch", "sequence"]),
    TensorSpec("attention_mask", "int64", [-1, -1], ["batch", "sequence"]),
]


def test_dim_kinds_follow_optimum_names():
    assert dim_kind("batch_size") == "batch"
    assert dim_kind("sequence_length") == "sequence"
    assert dim_kind("past_sequence_length") == "past"
    assert dim_kind("past_sequence_length + sequence_length") == "total"


def test_parse_shapes():
    assert parse_shapes("input_ids:8x128,attention_mask:1x1") == {
        "input_ids": [8, 128],
        "attention_mask": [1, 1],
    }
    for bad in ("input_ids", "input_ids:8xq", ":8x1", "input_ids:-1x2"):
        with pytest.raises(InputError):
            parse_shapes(bad)


def test_one_input_sets_range_for_all_sharing_dims():
    profile = build_profile(INPUTS, {}, {"input_ids": [4, 64]}, {"input_ids": [16, 256]})
    assert profile["attention_mask"].opt == [4, 64]
    assert profile["attention_mask"].max == [16, 256]
    assert profile["input_ids"].min == [1, 1]


def test_position_limit_caps_default_and_rejects_user_excess():
    profile = build_profile(INPUTS, {}, {}, {}, position_limit=128)
    assert profile["input_ids"].max == [32, 128]
    with pytest.raises(InputError, match="exceeds the model's 128 positions"):
        build_profile(INPUTS, {}, {}, {"input_ids": [8, 256]}, position_limit=128)


def test_bad_ranges_and_unknown_names():
    with pytest.raises(InputError, match="min <= opt <= max"):
        build_profile(INPUTS, {"input_ids": [8, 1]}, {"input_ids": [4, 16]}, {})
    with pytest.raises(InputError, match="unknown input"):
        build_profile(INPUTS, {"token_type_ids": [1, 1]}, {}, {})


def test_conflicting_entries_for_a_shared_dim_name_both():
    """attention_mask shares input_ids' batch and sequence dims: 8 vs 4 would use one of them."""
    with pytest.raises(InputError) as caught:
        build_profile(INPUTS, {}, {}, {"input_ids": [8, 64], "attention_mask": [4, 64]})
    assert str(caught.value) == (
        "--max-shapes gives input_ids batch 8 but attention_mask batch 4; "
        "inputs sharing the batch dim must agree"
    )
    with pytest.raises(InputError, match="--opt-shapes gives input_ids sequence 16 but"):
        build_profile(INPUTS, {}, {"input_ids": [4, 16], "attention_mask": [4, 32]}, {})
    # Agreeing entries are fine, and the same input twice must agree too.
    profile = build_profile(INPUTS, {}, {}, {"input_ids": [8, 64], "attention_mask": [8, 64]})
    assert profile["attention_mask"].max == [8, 64] and profile["input_ids"].max == [8, 64]
    with pytest.raises(
        InputError, match=r"input_ids given twice \(input_ids:8x64 and input_ids:4x64\)"
    ):
        parse_shapes("input_ids:8x64,input_ids:4x64")
    assert parse_shapes("input_ids:8x64,input_ids:8x64") == {"input_ids": [8, 64]}
