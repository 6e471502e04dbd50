"""SpaRTA's inference form: a base holding any number of SpaRTA adapters, the active one merged in
place (no runtime cost). The values a merge overwrites are kept, so unmerging restores the base
exactly and one replica switches between adapters by unmerge + merge. the method's `load` builds it."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from workers.errors import AdapterIntegrityError
from workers.methods.sparta.files import read_adapter
from workers.methods.sparta.selection import named_parameters


class SpartaModel(nn.Module):
    """A base holding any number of SpaRTA adapters; the active one is merged in place."""

    def __init__(self, base, task: str):
        super().__init__()
        self.base_model = base
        self.task = task
        self.adapters: dict[str, dict] = {}
        self.folders: dict[str, Path] = {}
        self.active: str | None = None
        self._originals: dict[str, object] = {}
        self.config = getattr(base, "config", None)

    def load_adapter(self, folder, adapter_name: str = "default", **_):
        if adapter_name in self.adapters:
            raise AdapterIntegrityError(f"adapter {adapter_name!r} is already loaded")
        self.adapters[adapter_name] = read_adapter(Path(folder), self.base_model, self.task)
        self.folders[adapter_name] = Path(folder)
        if self.active is None:
            self.set_adapter(adapter_name)

    @torch.no_grad()
    def unmerge(self) -> None:
        params = named_parameters(self.base_model)
        for name, (flat, values) in self._originals.items():
            params[name].data.view(-1)[flat] = values
        self._originals = {}
        self.active = None

    @torch.no_grad()
    def set_adapter(self, name: str) -> None:
        if name == self.active:
            return
        if name not in self.adapters:
            raise KeyError(name)
        self.unmerge()
        params = named_parameters(self.base_model)
        for pname, flat, delta, init in self.adapters[name]["entries"]:
            view = params[pname].data.view(-1)
            self._originals[pname] = (flat, view[flat].clone())
            src = view[flat].float() if init is None else init
            view[flat] = (src + delta).to(view.dtype)
        self.active = name

    @property
    def active_adapter(self):
        return self.active

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        return self.base_model.generate(*args, **kwargs)

    def merge_and_unload(self):
        """The base with the active adapter merged; this wrapper lets go of it."""
        base = self.base_model
        self._originals, self.adapters, self.active = {}, {}, None
        return base

    def save_pretrained(self, directory, safe_serialization: bool = True, **_):
        """The active adapter's files again (read back from what was loaded)."""
        import shutil

        src = self.folders[self.active]
        Path(directory).mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.name != "adapterflow.json":
                shutil.copy2(f, Path(directory) / f.name)
