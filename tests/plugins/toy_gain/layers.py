"""The toy gain's model (torch)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

CONFIG = "gain_config.json"
WEIGHTS = "gain.safetensors"


class GainModel(nn.Module):
    def __init__(self, base, target: str, init: float, task: str):
        super().__init__()
        self.base_model = base
        self.target, self.task = target, task
        self.modules_ = [m for n, m in base.named_modules() if n.endswith(target) and isinstance(m, nn.Linear)]
        if not self.modules_:
            raise ValueError(f"no Linear module ends with {target!r}")
        for p in base.parameters():
            p.requires_grad_(False)
        self.head = [n for n, _ in base.named_parameters() if n.split(".")[0] in ("score", "classifier")]
        for n, p in base.named_parameters():
            if n in self.head:
                p.requires_grad_(True)
        self.gains = nn.Parameter(torch.full((len(self.modules_),), float(init)))
        for i, m in enumerate(self.modules_):
            m.register_forward_hook(lambda mod, args, out, i=i: out * self.gains[i].to(out.dtype))
        self.config = getattr(base, "config", None)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def set_adapter(self, name: str) -> None:  # one adapter per replica
        pass

    def save_pretrained(self, directory: Path, **_) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        params = dict(self.base_model.named_parameters())
        tensors = {"gains": self.gains.detach().float().cpu().contiguous()}
        tensors.update({f"head.{n}": params[n].detach().cpu().contiguous() for n in self.head})
        save_file(tensors, str(directory / WEIGHTS))
        (directory / CONFIG).write_text(json.dumps({"target": self.target, "task": self.task}))

    @classmethod
    def from_folder(cls, base, folder: Path) -> GainModel:
        cfg = json.loads((folder / CONFIG).read_text())
        tensors = load_file(str(folder / WEIGHTS))
        model = cls(base, cfg["target"], 1.0, cfg["task"])
        with torch.no_grad():
            model.gains.copy_(tensors["gains"])
            params = dict(base.named_parameters())
            for k, v in tensors.items():
                if k.startswith("head."):
                    params[k[5:]].copy_(v)
        return model.eval()
