"""The quality table of docs/benchmarks.md from the rows `methods_sst2.py` wrote (one JSON line per row).

    python benchmarks/methods_table.py benchmarks/results/methods_sst2.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def describe(row: dict) -> str:
    cfg = row.get("config") or {}
    method = row["method"]
    if method == "lora":
        return "LoRA r=8 (query, value)"
    if method == "ia3":
        return "IA3 (key, value, output.dense)"
    if method == "pvera":
        targets = ", ".join(cfg.get("target_modules", ["query", "value"]))
        return f"PVeRA r={cfg.get('r', 128)} ({targets})"
    if method == "sparta":
        return f"SpaRTA, sparsity {row['sparsity']:.4f} (matched to LoRA)"
    if method == "nls-heuristic":
        ranks = sorted(set(row.get("ranks", [])))
        return f"NLS [16, 12, 8], heuristic sub-adapter (rank {', '.join(map(str, ranks))})"
    if method == "none":
        return "no adapter (the head alone, linear probe)"
    if method == "sparsepeft":
        return "SparsePEFT r=8 (query, value)"
    if method == "qa-sparsepeft":
        return "QA-SparsePEFT r=8, INT4 group 128"
    return method


def table(rows: list[dict]) -> str:
    header = ("| method | base | lr | dev accuracy | balanced | MCC | F1 | trainable | adapter bytes | train s | "
              "non-zeros added by merging |")
    out = [header, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("partial"):
            continue
        size = "—" if r.get("adapter_bytes") is None else f"{r['adapter_bytes']:,}"
        acc = f"**{r['accuracy']:.3f}**" + (f" ± {r['accuracy_std']:.3f}" if "accuracy_std" in r else "")
        out.append(
            f"| {describe(r)} | {r['base']} | {r['lr']:g} | {acc} | {r['balanced_accuracy']:.3f} "
            f"| {r['mcc']:.3f} | {r['f1']:.3f} | {r['trainable_params']:,} | {size} | {r['train_seconds']:.0f} "
            f"| {r['nonzeros_added']:,} |"
        )
    return "\n".join(out)


def sweeps(rows: list[dict]) -> str:
    parts = []
    for r in rows:
        pts = sorted(r["sweep"], key=lambda p: (p.get("candidate", 0), p["lr"]))
        name = r["method"] + (" (pruned)" if "Wanda" in r["base"] else "")
        text = ", ".join(
            (f"c{p['candidate']} " if "candidate" in p else "") + f"{p['lr']:g} {p['accuracy']:.3f}" for p in pts
        )
        parts.append(f"{name}: {text}")
    return "; ".join(parts)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit(__doc__.strip())
    rows = [json.loads(line) for line in Path(argv[0]).read_text().splitlines() if line.strip()]
    print(table(rows))
    print()
    print("Sweeps (lr and held-out accuracy; cN = candidate configuration N):", sweeps(rows))


if __name__ == "__main__":
    main()
