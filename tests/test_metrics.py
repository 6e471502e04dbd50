"""Evaluation metrics against scikit-learn (an independent reference)."""

import random

import pytest
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, matthews_corrcoef

from workers.evaluate import classification_report


@pytest.mark.parametrize("num_labels,seed", [(2, 0), (2, 1), (3, 2), (5, 3)])
def test_classification_report_matches_sklearn(num_labels, seed):
    rng = random.Random(seed)
    labels = [rng.randrange(num_labels) for _ in range(200)]
    probs = []
    for t in labels:
        row = [rng.random() for _ in range(num_labels)]
        if rng.random() < 0.6:
            row[t] += 1.0  # better than chance, not perfect
        s = sum(row)
        probs.append([x / s for x in row])
    preds = [max(range(num_labels), key=r.__getitem__) for r in probs]
    rep = classification_report(labels, probs, num_labels, loss=0.5)
    assert rep["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    assert rep["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(labels, preds))
    assert rep["mcc"] == pytest.approx(matthews_corrcoef(labels, preds))
    avg = "binary" if num_labels == 2 else "macro"
    assert rep["f1"] == pytest.approx(f1_score(labels, preds, average=avg))
    assert rep["confusion_matrix"] == confusion_matrix(labels, preds, labels=list(range(num_labels))).tolist()
