"""The elastic config file and sub-adapter extraction (files only; torch through safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

from workers.errors import AdapterIntegrityError, SpecError

ELASTIC_FILE = "elastic_adapter_config.json"
VERSIONS = ("maximal", "heuristic", "minimal")


def group_key(module_name: str, group_by: str) -> str:
    """Layer groups: the first integer path component (the block index) of a module's name."""
    import re

    if group_by == "layer":
        m = re.search(r"\.(\d+)\.", f".{module_name}.")
        if m:
            return f"layer {m.group(1)}"
    return module_name


def strip_prefix(name: str) -> str:
    """PEFT module name -> the base model's module name."""
    return name.removeprefix("base_model.model.")


def elastic_groups(lora_a_names: list[str], search_space: list[int], group_by: str) -> list[dict]:
    groups: dict[str, list[str]] = {}
    for n in lora_a_names:
        groups.setdefault(group_key(strip_prefix(n.rsplit(".lora_A", 1)[0]), group_by), []).append(n)
    return [{"target": sorted(v), "search_space": list(search_space)} for v in groups.values()]


def write_elastic_config(spec, directory: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(Path(directory) / "adapter_model.safetensors"), framework="pt") as fh:
        names = sorted(k.removesuffix(".weight") for k in fh.keys() if ".lora_A" in k)
    config = elastic_groups(names, spec.search_space, spec.group_by)
    (Path(directory) / ELASTIC_FILE).write_text(json.dumps(config, indent=2) + "\n")


def rank_costs(folder: Path, groups: list[dict]) -> list[int]:
    """LoRA parameters per unit of rank in each group: the (in + out) features of its layers, read from
    the weights' shapes (A is r x in, B is out x r) without loading them."""
    from safetensors import safe_open

    costs = []
    with safe_open(str(Path(folder) / "adapter_model.safetensors"), framework="pt") as fh:
        for g in groups:
            total = 0
            for a_name in g["target"]:
                module = a_name.rsplit(".lora_A", 1)[0]
                total += fh.get_slice(f"{a_name}.weight").get_shape()[1]
                total += fh.get_slice(f"{module}.lora_B.weight").get_shape()[0]
            costs.append(total)
    return costs


def choose_ranks(groups: list[dict], version: str | list[int]) -> list[int]:
    if isinstance(version, str):
        if version not in VERSIONS:
            raise SpecError(f"sub-adapter version {version!r}: choose one of {', '.join(VERSIONS)} or give "
                            "one rank per group")
        pick = {"maximal": lambda s: s[0], "heuristic": lambda s: s[(len(s) - 1) // 2],
                "minimal": lambda s: s[-1]}[version]
        return [pick(g["search_space"]) for g in groups]
    if len(version) != len(groups):
        raise SpecError(f"{len(version)} ranks given for {len(groups)} groups; give one rank per group")
    for i, (r, g) in enumerate(zip(version, groups)):
        if r not in g["search_space"]:
            raise SpecError(f"group {i} ({g['target'][0]}...): rank {r} is not in its search space "
                            f"{g['search_space']}")
    return list(version)


def extract_subadapter(folder: Path, output: Path, version: str | list[int]) -> dict:
    """Write the sub-adapter of a super-adapter folder at the chosen ranks; returns a summary."""
    from safetensors.torch import load_file, save_file

    folder, output = Path(folder), Path(output)
    efile = folder / ELASTIC_FILE
    if not efile.is_file():
        raise AdapterIntegrityError(f"{folder}: no {ELASTIC_FILE}; not an NLS super-adapter")
    groups = json.loads(efile.read_text())
    ranks = choose_ranks(groups, version)
    config = json.loads((folder / "adapter_config.json").read_text())
    r_max, alpha = int(config["r"]), float(config["lora_alpha"])
    weights = load_file(str(folder / "adapter_model.safetensors"))
    rank_pattern, alpha_pattern, out = {}, {}, dict(weights)
    for g, r in zip(groups, ranks):
        for a_name in g["target"]:
            module = a_name.rsplit(".lora_A", 1)[0]
            a_key, b_key = f"{a_name}.weight", f"{module}.lora_B.weight"
            if a_key not in weights or b_key not in weights:
                raise AdapterIntegrityError(f"{folder}: {ELASTIC_FILE} names {a_name!r}, not in the weights")
            out[a_key] = weights[a_key][:r].contiguous().clone()
            out[b_key] = weights[b_key][:, :r].contiguous().clone()
            key = strip_prefix(module)
            rank_pattern[key] = r
            alpha_pattern[key] = alpha * r / r_max
    output.mkdir(parents=True, exist_ok=True)
    save_file(out, str(output / "adapter_model.safetensors"), metadata={"format": "pt"})
    config.update(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern)
    (output / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    params = sum(t.numel() for k, t in out.items() if "lora_" in k)
    return {"ranks": ranks, "groups": len(groups), "lora_params": params, "r_max": r_max,
            "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


def extract_artifact(folder: Path, manifest: dict, output: Path, version: str | list[int],
                     source: str | None = None) -> dict:
    """`extract_subadapter` plus the sub-adapter's own manifest (method lora, the same base), so
    it can be served, registered or merged like any adapter."""
    from workers.artifact import write_manifest

    summary = extract_subadapter(folder, output, version)
    sub = {**manifest.get("adapter", {}), "method": "lora", "r": summary["r_max"],
           "rank_pattern": summary["rank_pattern"], "alpha_pattern": summary["alpha_pattern"]}
    for k in ("search_space", "group_by", "seed"):
        sub.pop(k, None)
    write_manifest(Path(output), method="lora", model=manifest["model"], base_sha256=manifest["base_model"]["sha256"],
                   extra={"adapter": sub, "input_template": manifest.get("input_template"),
                          "max_length": manifest.get("max_length"),
                          "nls": {"super_adapter": source or str(folder), "version": version,
                                  "ranks": summary["ranks"]}})
    return summary
