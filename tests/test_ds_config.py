"""DeepSpeed configs for every ZeRO stage, precision and offload, checked by DeepSpeed's own parser.

No GPU exists here: the GPU configs (bf16, ZeRO-3, CPU/NVMe offload) are generated and parsed, not
run. DeepSpeed reads the data-parallel size from an `mpu` object; `_DataParallel` below stands in
for an 8-GPU cluster's topology (the only stand-in in this file).
"""

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pipelines.spec import parse_spec
from workers.ds_config import build_ds_config, worker_env


class _DataParallel:
    def __init__(self, n):
        self.n = n

    def get_data_parallel_world_size(self):
        return self.n


@pytest.fixture(scope="module")
def ds_parse():
    import socket

    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    import deepspeed.comm
    from deepspeed.runtime.config import DeepSpeedConfig

    deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)

    yield lambda cfg, world: DeepSpeedConfig(cfg, mpu=_DataParallel(world))
    deepspeed.comm.destroy_process_group()


def spec_train(**train):
    return parse_spec({"name": "t", "model": {"name": "m"}, "data": {"path": "p"},
                       "adapter": {"method": "lora"}, "train": train}).train


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_cpu_configs_all_stages(ds_parse, stage):
    t = spec_train(zero_stage=stage, num_workers=2, global_batch_size=32, grad_accum=2)
    c = ds_parse(build_ds_config(t, 2), 2)
    assert c.zero_optimization_stage == stage
    assert (c.train_batch_size, c.train_micro_batch_size_per_gpu, c.gradient_accumulation_steps) == (32, 8, 2)
    assert not c.bfloat16_config.enabled and not c.float16_config.enabled
    assert worker_env(t)["DS_ACCELERATOR"] == "cpu"


def test_gpu_zero3_bf16_nvme_offload(ds_parse):
    t = spec_train(use_gpu=True, num_workers=8, zero_stage=3, offload="nvme", nvme_path="/local_nvme",
                   global_batch_size=64, grad_accum=2)
    c = ds_parse(build_ds_config(t, 8), 8)
    assert c.zero_optimization_stage == 3 and c.bfloat16_config.enabled
    assert c.zero_config.offload_optimizer.device == "nvme"
    assert str(c.zero_config.offload_param.nvme_path) == "/local_nvme"
    assert c.zero_config.gather_16bit_weights_on_model_save
    assert c.train_micro_batch_size_per_gpu == 4
    assert "DS_ACCELERATOR" not in worker_env(t)
    assert t.resolved_backend() == "nccl"


def test_gpu_zero2_cpu_offload_fp16(ds_parse):
    t = spec_train(use_gpu=True, num_workers=4, zero_stage=2, offload="cpu", precision="fp16",
                   global_batch_size=32)
    c = ds_parse(build_ds_config(t, 4), 4)
    assert c.float16_config.enabled and not c.bfloat16_config.enabled
    assert c.zero_config.offload_optimizer.device == "cpu"
    assert c.zero_config.offload_param is None


def test_batch_mismatch_is_refused():
    t = spec_train(num_workers=2, global_batch_size=32)
    with pytest.raises(ValueError, match="not divisible"):
        build_ds_config(t, 3)
