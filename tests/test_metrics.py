"""Downstream metrics against hand-computed values."""

import math

import numpy as np
import pytest

from ssamba.tasks.metrics import (
    accuracy,
    average_precision,
    confusion_matrix,
    d_prime,
    markdown_table,
    mean_average_precision,
    roc_auc,
    task_metrics,
)


def test_accuracy_and_confusion():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4], [0.0, 0.2, 0.8]])
    labels = np.array([0, 1, 2, 2])
    assert accuracy(scores, labels) == 0.75
    assert accuracy(scores, np.eye(3)[labels]) == 0.75  # one-hot targets
    m = confusion_matrix(scores, labels, 3)
    assert m.tolist() == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    with pytest.raises(ValueError, match="empty"):
        accuracy(np.zeros((0, 3)), np.zeros(0))


def test_average_precision_by_hand():
    # ranks 1..4 = positive, negative, positive, negative: precision 1 at recall 1/2, 2/3 at recall 1
    assert average_precision([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # a tie forms one threshold: {0.5: one positive of two items}, then {0.1: both positives of three}
    assert average_precision([0.5, 0.5, 0.1], [1, 0, 1]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert average_precision([0.3, 0.2, 0.1], [1, 1, 0]) == 1.0
    assert math.isnan(average_precision([0.3, 0.2], [0, 0]))


def test_auc_and_d_prime_by_hand():
    # positive-negative pairs: (0.9, 0.8) yes, (0.9, 0.6) yes, (0.7, 0.8) no, (0.7, 0.6) yes -> 3/4
    assert roc_auc([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.75)
    # ties count one half: (0.5 vs 0.5) 1/2, (0.1 vs 0.5) 0 -> 1/4
    assert roc_auc([0.5, 0.5, 0.1], [1, 0, 1]) == pytest.approx(0.25)
    assert math.isnan(roc_auc([0.1, 0.2], [1, 1]))
    # d' = sqrt(2) * Phi^-1(auc); Phi^-1(0.75) = 0.6744897501960817
    assert d_prime(0.75) == pytest.approx(math.sqrt(2) * 0.6744897501960817)
    assert d_prime(0.5) == pytest.approx(0.0, abs=1e-12)
    assert d_prime(1.0) == math.inf


def test_map_skips_classes_without_positives_and_task_metrics():
    scores = np.array([[0.9, 0.1, 0.3], [0.8, 0.7, 0.2], [0.7, 0.2, 0.1], [0.6, 0.9, 0.0]])
    targets = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    # class 0: AP 5/6 (as above); class 1: scores 0.1, 0.7, 0.2, 0.9 -> positives at ranks 1, 2 -> AP 1;
    # class 2 has no positive and is left out
    assert mean_average_precision(scores, targets) == pytest.approx((5 / 6 + 1.0) / 2)
    out = task_metrics(scores, targets, multilabel=True)
    assert out["mAP"] == pytest.approx((5 / 6 + 1.0) / 2)
    auc0 = roc_auc(scores[:, 0], targets[:, 0])
    auc1 = roc_auc(scores[:, 1], targets[:, 1])
    assert out["auc"] == pytest.approx((auc0 + auc1) / 2)
    assert out["d_prime"] == pytest.approx(d_prime(out["auc"]))
    assert set(task_metrics(scores, targets, multilabel=False)) == {"acc", "mAP"}


def test_markdown_table():
    text = markdown_table([{"a": "x", "b": 0.12345}, {"a": "y", "b": float("nan")}], ["a", "b"])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| x | 0.123 |", "| y | nan |"]
