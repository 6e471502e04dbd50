"""SpaRTA's inference form: a base holding any number of SpaRTA adapters, the active one merged in
place (no runtime cost). The values a merge overwrites are kept, so unmerging restores the base
exactly and one replica switches between adapters by unmerge + merge. the method's `load` builds it."""

from __future__ import annotations

import contextlib
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
        self._params: dict | None = None  # name -> parameter, refreshed when a load may replace tensors
        self.config = getattr(base, "config", None)

    def load_adapter(self, folder, adapter_name: str = "default", **_):
        if adapter_name in self.adapters:
            raise AdapterIntegrityError(f"adapter {adapter_name!r} is already loaded")
        active = self.active
        self.unmerge()  # the base as it is: its values at the adapter's indices are what a merge overwrites
        try:
            entries = read_adapter(Path(folder), self.base_model, self.task)["entries"]
        except Exception:
            if active is not None:
                self.set_adapter(active)  # a refused adapter leaves the replica as it was
            raise
        self._params = None  # loading may have grown the embeddings (a new tensor)
        params = self._param_map()
        prepared = []
        for pname, flat, delta, init in entries:
            view = params[pname].data.view(-1)
            original = view[flat].clone()
            src = original.float() if init is None else init
            # a switch only writes: the base's values back, this adapter's merged values in
            prepared.append((pname, flat, original, (src + delta).to(view.dtype)))
        self.adapters[adapter_name] = {"entries": prepared}
        self.folders[adapter_name] = Path(folder)
        for adapter in self.adapters.values():  # flat views of the current tensors, for every adapter
            adapter["views"] = [params[pname].data.view(-1) for pname, *_ in adapter["entries"]]
        self.set_adapter(active or adapter_name)

    def _param_map(self) -> dict:
        if self._params is None:
            self._params = named_parameters(self.base_model)
        return self._params

    @torch.no_grad()
    def unmerge(self) -> None:
        """The base restored exactly (the overwritten values were kept)."""
        if self.active is not None:
            adapter = self.adapters[self.active]
            for view, (_, flat, original, _) in zip(adapter["views"], adapter["entries"]):
                view.index_put_((flat,), original)
        self.active = None

    @torch.no_grad()
    def set_adapter(self, name: str) -> None:
        if name == self.active:
            return
        if name not in self.adapters:
            raise KeyError(name)
        self.unmerge()
        adapter = self.adapters[name]
        for view, (_, flat, _, merged) in zip(adapter["views"], adapter["entries"]):
            view.index_put_((flat,), merged)
        self.active = name

    @torch.no_grad()
    def delete_adapter(self, name: str) -> None:
        if name == self.active:
            self.unmerge()
        self.adapters.pop(name)
        self.folders.pop(name, None)

    @contextlib.contextmanager
    def disable_adapter(self):
        """The base alone for the duration (as PEFT's `disable_adapter`)."""
        active = self.active
        self.unmerge()
        try:
            yield
        finally:
            if active is not None:
                self.set_adapter(active)

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
        self.adapters, self.active = {}, None
        return base

    def save_pretrained(self, directory, safe_serialization: bool = True, **_):
        """The active adapter's files again (read back from what was loaded)."""
        import shutil

        src = self.folders[self.active]
        Path(directory).mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.is_file() and f.name != "adapterflow.json":
                shutil.copy2(f, Path(directory) / f.name)
