"""Evaluation reports: the peft-sparta `evaluate` report for classifiers, loss and perplexity for
causal LMs. Metrics are computed from predictions here with plain formulas."""

from __future__ import annotations

import math

from workers.errors import DataError


def classification_report(labels: list[int], probs, num_labels: int, loss: float) -> dict:
    """accuracy, balanced accuracy, MCC (multi-class Gorodkin form), F1 and confusion matrix."""
    preds = [max(range(num_labels), key=lambda k: row[k]) for row in probs]
    cm = [[0] * num_labels for _ in range(num_labels)]  # cm[true][pred]
    for t, p in zip(labels, preds):
        cm[t][p] += 1
    n = len(labels)
    correct = sum(cm[i][i] for i in range(num_labels))
    recalls = [cm[i][i] / sum(cm[i]) for i in range(num_labels) if sum(cm[i])]
    f1s = []
    for k in range(num_labels):
        tp = cm[k][k]
        fp = sum(cm[i][k] for i in range(num_labels)) - tp
        fn = sum(cm[k]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    t_k = [sum(cm[k]) for k in range(num_labels)]
    p_k = [sum(cm[i][k] for i in range(num_labels)) for k in range(num_labels)]
    cov_tp = correct * n - sum(t * p for t, p in zip(t_k, p_k))
    denom = math.sqrt((n * n - sum(p * p for p in p_k)) * (n * n - sum(t * t for t in t_k)))
    report = {
        "n": n,
        "loss": loss,
        "accuracy": correct / n if n else 0.0,
        "balanced_accuracy": sum(recalls) / len(recalls) if recalls else 0.0,
        "mcc": cov_tp / denom if denom else 0.0,
        "f1": f1s[1] if num_labels == 2 else sum(f1s) / num_labels,
        "f1_macro": sum(f1s) / num_labels,
        "confusion_matrix": cm,
    }
    return report


def length_grouped(examples, batch_size: int) -> list[list[int]]:
    """Indices of `examples` in batches of neighbours in length (longest first): the least padding,
    and the same outputs as any other order."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def evaluate_model(model, tokenizer, examples, task: str, num_labels: int | None,
                   batch_size: int = 32) -> dict:
    """Run `model` over tokenized examples (workers.data.Example) without gradients, in batches grouped
    by length; per-example outputs are put back in the examples' order."""
    import torch
    import torch.nn.functional as F

    from workers.data import collate

    model.eval()
    total_loss, total_count = 0.0, 0
    labels_all, probs_all = [None] * len(examples), [None] * len(examples)
    with torch.no_grad():
        for idx in length_grouped(examples, batch_size):
            chunk = [examples[i] for i in idx]
            batch = collate(chunk, tokenizer.pad_token_id)
            labels = batch.pop("labels")
            logits = model(**batch).logits.float()
            if task == "seq-cls":
                total_loss += F.cross_entropy(logits, labels, reduction="sum").item()
                total_count += len(chunk)
                for i, p, y in zip(idx, torch.softmax(logits, -1).tolist(), labels.tolist()):
                    probs_all[i], labels_all[i] = p, y
            else:
                shift_logits = logits[:, :-1].reshape(-1, logits.size(-1))
                shift_labels = labels[:, 1:].reshape(-1)
                mask = shift_labels != -100
                total_loss += F.cross_entropy(
                    shift_logits[mask], shift_labels[mask], reduction="sum"
                ).item()
                total_count += int(mask.sum())
    if total_count == 0:
        raise DataError("no evaluation examples: the evaluation split is empty")
    mean = total_loss / total_count
    if task == "seq-cls":
        report = classification_report(labels_all, probs_all, num_labels, mean)
        report["eval_loss"] = mean
        return report
    return {"n": len(examples), "tokens": total_count, "eval_loss": mean, "perplexity": math.exp(min(mean, 50))}
