"""ZeRO-3 (parameters partitioned across the workers) trains the same adapter as ZeRO-2: two Ray Train
workers over gloo, identical seeds and data, the loss curves and the saved adapters agree. LoRA goes
through PEFT's layers; SpaRTA through its parametrizations (the partitioned original weight is gathered
when the parametrization reads it)."""

import pytest
import torch
from safetensors.torch import load_file

from workers.stages import build_artifact, launch_training

from helpers import METHOD_CASES, adapter_spec, spec_for

pytestmark = pytest.mark.slow


def _run(tiny_llama, toy_data, tmp, method, stage):
    spec = spec_for(tiny_llama, toy_data, tmp / f"z{stage}", lr=3e-2, num_workers=2, zero_stage=stage,
                    global_batch_size=16, max_steps=6, checkpoint_every=3)
    spec = spec.model_copy(update={"adapter": adapter_spec(METHOD_CASES[method]["adapter"])})
    out = launch_training(spec, run_name=f"zero{stage}-{method}")
    folder = build_artifact(spec, out.checkpoint, tmp / f"adapter{stage}")
    return out, folder


@pytest.mark.parametrize("method", ["lora", "sparta"])
def test_zero3_trains_what_zero2_trains(method, tiny_llama, toy_data, tmp_path, ray_session):
    z2, f2 = _run(tiny_llama, toy_data, tmp_path, method, 2)
    z3, f3 = _run(tiny_llama, toy_data, tmp_path, method, 3)
    l2 = [h["loss"] for h in z2.history]
    l3 = [h["loss"] for h in z3.history]
    assert len(l2) == len(l3) == 6
    assert l3 == pytest.approx(l2, rel=1e-4, abs=1e-5)
    assert z3.metrics["trainable_params"] == z2.metrics["trainable_params"]
    name = "sparse_deltas.safetensors" if method == "sparta" else "adapter_model.safetensors"
    w2, w3 = load_file(f2 / name), load_file(f3 / name)
    assert w2.keys() == w3.keys()
    # trained, not fresh: LoRA's B (initialised to 0) and SpaRTA's deltas (0) have moved
    moved = [t for k, t in w2.items() if ("lora_B" in k if method == "lora" else "score" not in k) and t.numel()]
    assert moved and max(t.abs().max().item() for t in moved) > 1e-3
    for k in w2:
        assert w3[k].shape == w2[k].shape, k  # whole tensors, not one worker's partition
        assert torch.allclose(w3[k], w2[k], rtol=1e-3, atol=1e-5), k
