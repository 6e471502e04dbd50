"""INT4 group-wise quantization (asymmetric, round-to-nearest) and the packed INT4 model format.

Per output row, each group of `group_size` consecutive inputs has a scale s and an integer zero
point z in [0, 15], taken from the group's range with 0 always inside it:
    lo = min(w_min, 0), hi = max(w_max, 0), s = (hi - lo) / 15, z = clamp(round(-lo / s), 0, 15)
    q = clamp(round(w / s + z), 0, 15),  w_q = s · (q - z)
A zero weight maps to q = z and back to exactly 0, so a sparse weight stays exactly as sparse.

Packed model folder (`adapterflow merge` of a QA-SparsePEFT adapter):
- `model.safetensors`: for every quantized Linear `L`: `L.qweight` uint8 [out, in/2] holding two
  4-bit values per byte (input column 2j in the low nibble, 2j+1 in the high nibble),
  `L.scales` float32 [out, in/group_size], `L.zeros` uint8 [out, in/group_size], `L.bias` if any;
  every other parameter as a plain tensor under its usual name.
- `config.json`: the base config plus `adapterflow_quantization` = {"format": "int4-groupwise",
  "bits": 4, "group_size": G, "layers": [names]}; tokenizer files beside it.
`load_int4_model(folder)` rebuilds the model on CPU with `Int4Linear` modules that keep the packed
weight and dequantize it in the matmul.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from workers.errors import ModelError

FORMAT = "int4-groupwise"
QMAX = 15
CONFIG_KEY = "adapterflow_quantization"


def check_group(in_features: int, group_size: int, name: str = "layer") -> None:
    if in_features % group_size or group_size % 2:
        raise ValueError(
            f"{name}: in_features {in_features} is not a multiple of group_size {group_size} (or the group "
            "size is odd); choose a group_size that divides every quantized layer's input size"
        )


def qparams(weight, group_size: int):
    """(scales [out, groups] float32, zeros [out, groups] float32 integers) from `weight`."""
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group_size, group_size)
    lo = w.amin(-1).clamp(max=0)
    hi = w.amax(-1).clamp(min=0)
    scales = (hi - lo) / QMAX
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    zeros = torch.clamp(torch.round(-lo / scales), 0, QMAX)
    return scales, zeros


def _expand(t, group_size: int):
    return t.repeat_interleave(group_size, dim=1)


def quantize_codes(weight, scales, zeros, group_size: int):
    """Integer codes q in [0, 15] (as float) for `weight` under fixed scales and zero points."""
    s, z = _expand(scales, group_size), _expand(zeros, group_size)
    return torch.clamp(torch.round(weight.float() / s + z), 0, QMAX)


def fake_quant(weight, scales, zeros, group_size: int):
    """w_q = s·(clamp(round(w/s + z), 0, 15) - z), in the weight's dtype."""
    s, z = _expand(scales, group_size), _expand(zeros, group_size)
    return (s * (quantize_codes(weight, scales, zeros, group_size) - z)).to(weight.dtype)


def fake_quant_ste(weight, scales, zeros, group_size: int):
    """Forward: the quantized weight; backward: identity (straight-through estimator)."""
    return weight + (fake_quant(weight, scales, zeros, group_size) - weight).detach()


def pack(codes):
    """[out, in] codes 0..15 -> uint8 [out, in/2]: column 2j low nibble, 2j+1 high nibble."""
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack(packed):
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8)
    out[:, 0::2] = packed & 0x0F
    out[:, 1::2] = packed >> 4
    return out


def dequantize(qweight, scales, zeros, group_size: int, dtype=None):
    q = unpack(qweight).float()
    w = _expand(scales.float(), group_size) * (q - _expand(zeros.float(), group_size))
    return w.to(dtype or torch.float32)


class Int4Linear(nn.Module):
    """A Linear whose weight stays packed INT4; dequantized group-wise in each matmul."""

    def __init__(self, in_features, out_features, group_size, bias: bool, dtype):
        super().__init__()
        check_group(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(out_features, in_features // group_size))
        self.register_buffer("zeros", torch.zeros(out_features, in_features // group_size, dtype=torch.uint8))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.compute_dtype = dtype

    @property
    def weight(self):
        return dequantize(self.qweight, self.scales, self.zeros, self.group_size, self.compute_dtype)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size={self.group_size}"


def save_int4_model(model, tokenizer, folder: Path, layers: dict, group: int) -> dict:
    """Write `model` in the packed format. `layers`: name -> (scales, zeros) of every quantized
    Linear, whose weight already holds grid values."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not layers:
        raise ValueError("no quantized Linear layers in the model")
    modules = dict(model.named_modules())
    tensors, skip = {}, set()
    for name, (scales, zeros) in layers.items():
        weight = modules[name].weight.detach()
        codes = quantize_codes(weight, scales, zeros, group)
        back = fake_quant(weight.float(), scales, zeros, group)
        if not torch.allclose(back, weight.float(), atol=1e-6, rtol=1e-5):
            raise ValueError(f"{name}: weight is not on its INT4 grid; quantize before packing")
        tensors[f"{name}.qweight"] = pack(codes).contiguous()
        tensors[f"{name}.scales"] = scales.float().contiguous()
        tensors[f"{name}.zeros"] = zeros.to(torch.uint8).contiguous()
        skip.add(f"{name}.weight")
    for name, p in model.state_dict().items():
        if name not in skip and name not in tensors:
            tensors[name] = p.detach().contiguous().clone()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]  # the class these tensors belong to
    cfg[CONFIG_KEY] = {"format": FORMAT, "bits": 4, "group_size": group, "layers": sorted(layers)}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))
    return {"layers": len(layers), "group_size": group}


def load_int4_model(folder: Path, dtype=None):
    """A packed INT4 model folder rebuilt on CPU (Int4Linear layers; weights from safetensors)."""
    import transformers
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_dict = json.loads((folder / "config.json").read_text())
    q = cfg_dict.get(CONFIG_KEY)
    if not q or q.get("format") != FORMAT:
        raise ModelError(f"{folder}: not a packed INT4 model (config.json has no {CONFIG_KEY} of format {FORMAT})")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    arch = (config.architectures or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ModelError(f"{folder}: unknown architecture {arch!r}")
    dtype = dtype or torch.float32
    model = cls(config).to(dtype)
    for name in q["layers"]:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, attr)
        setattr(parent, attr, Int4Linear(lin.in_features, lin.out_features, q["group_size"], lin.bias is not None, dtype))
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [m for m in missing if m not in tied and not m.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise ModelError(f"{folder}: tensors missing {missing[:5]} / unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
