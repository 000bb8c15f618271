import numpy as np
import pytest

from cl_merge import metrics


def oracle(A, expert):
    """Independent oracle: 1-based A[t][i] as in the SAIM paper, via numpy."""
    A = np.array(A, dtype=float)
    T = A.shape[1]
    acc = A[T].mean()
    bwt = np.mean([A[T, i - 1] - A[i, i - 1] for i in range(1, T)])
    fwt = np.mean([A[i - 1, i - 1] - A[0, i - 1] for i in range(2, T + 1)])
    norm = A[T] / np.array(expert)
    return acc, bwt, fwt, norm


@pytest.mark.parametrize("T", [2, 3, 5, 8])
def test_metrics_match_oracle(T):
    rng = np.random.default_rng(T)
    A = rng.uniform(0, 1, size=(T + 1, T)).tolist()
    expert = rng.uniform(0.5, 1, size=T).tolist()
    acc, bwt, fwt, norm = oracle(A, expert)
    assert metrics.acc(A) == pytest.approx(acc)
    assert metrics.bwt(A) == pytest.approx(bwt)
    assert metrics.fwt(A) == pytest.approx(fwt)
    assert metrics.normalized_accuracy(A, expert) == pytest.approx(norm.tolist())
    assert metrics.mean_normalized_accuracy(A, expert) == pytest.approx(norm.mean())


def test_bwt_uses_t_minus_1_denominator_on_a_hand_example():
    # T = 3: task 1 drops 0.9 -> 0.6, task 2 drops 0.8 -> 0.8; BWT = (-0.3 + 0.0) / 2
    A = [[0.1, 0.2, 0.3], [0.9, 0.3, 0.3], [0.7, 0.8, 0.4], [0.6, 0.8, 0.7]]
    assert metrics.bwt(A) == pytest.approx(-0.15)
    assert metrics.acc(A) == pytest.approx(0.7)
    # A[1][2] - A[0][2] = 0.3 - 0.2 and A[2][3] - A[0][3] = 0.4 - 0.3
    assert metrics.fwt(A) == pytest.approx(((0.3 - 0.2) + (0.4 - 0.3)) / 2)


def test_fwt_is_null_when_unseen_tasks_were_not_evaluated():
    A = [[0.1, 0.2, 0.3], [0.9, None, None], [0.7, 0.8, None], [0.6, 0.8, 0.7]]
    assert metrics.fwt(A) is None
    assert metrics.bwt(A) == pytest.approx(-0.15)


def test_malformed_matrix_is_rejected():
    with pytest.raises(ValueError):
        metrics.acc([[0.1, 0.2], [0.3]])
