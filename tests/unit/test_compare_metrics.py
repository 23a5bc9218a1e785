import numpy as np
import pytest

from trtpipe.compare import Tolerances, compare_outputs, cosine_rows, row_view


def test_row_view_keeps_only_real_tokens():
    value = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    rows = row_view(value, mask)
    assert rows.shape == (3, 2)
    np.testing.assert_array_equal(rows, [[0, 1], [2, 3], [6, 7]])


def test_cosine_rows_known_values():
    a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    b = np.array([[0.0, 1.0], [2.0, 2.0], [0.0, 0.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [0.0, 1.0, 1.0])


def test_padding_errors_are_ignored_but_real_errors_counted():
    reference = np.ones((2, 4, 3), np.float32)
    engine = reference.copy()
    engine[0, 3] = 100.0  # padded position: must not count
    engine[1, 0, 0] = 1.5  # real token: must count
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]])
    report = compare_outputs(
        [{"h": engine}], [{"h": reference}], [mask], "feature-extraction", Tolerances(max_abs=1e-4)
    )["h"]
    assert report.rows == 7
    assert report.max_abs == pytest.approx(0.5)
    assert report.failures == ["max_abs 0.5 > 0.0001"]


def test_top1_agreement_for_classification():
    reference = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    engine = reference.copy()
    engine[3] = [0.4, 0.6]
    report = compare_outputs(
        [{"logits": engine}],
        [{"logits": reference}],
        [None],
        "text-classification",
        Tolerances.for_precision("int8"),
    )["logits"]
    assert report.top1_agreement == pytest.approx(0.75)
    assert any(f.startswith("top1_agreement 0.7500 < 0.98") for f in report.failures)


def test_default_tolerances_by_precision():
    assert Tolerances.for_precision("fp32").max_abs == 1e-4
    assert Tolerances.for_precision("fp16").cosine_min == 0.999
    int8 = Tolerances.for_precision("int8")
    assert (int8.cosine_mean, int8.cosine_min) == (0.99, 0.97)


def test_per_token_scalars_across_batches_of_different_lengths():
    """QA start/end logits: [B, S] rows, S differs between batches, padding ignored."""
    ref_a = np.array([[1.0, 2.0, 3.0], [1.0, -1.0, 0.0]])
    ref_b = np.array([[0.5, 0.1, 0.2, 0.9, 7.0]])
    eng_a, eng_b = ref_a.copy(), ref_b.copy()
    eng_a[1, 2] = 50.0  # padding
    eng_b[0, 3] = 1.9  # a real token changes, the argmax stays at position 3
    masks = [np.array([[1, 1, 1], [1, 1, 0]]), np.array([[1, 1, 1, 1, 0]])]
    report = compare_outputs(
        [{"start_logits": eng_a}, {"start_logits": eng_b}],
        [{"start_logits": ref_a}, {"start_logits": ref_b}],
        masks,
        "question-answering",
        Tolerances(),
    )["start_logits"]
    assert report.rows == 3
    assert report.max_abs == pytest.approx(1.0)
    assert report.top1_agreement == pytest.approx(1.0)
    assert report.cosine_min < 1.0
