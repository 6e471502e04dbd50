"""DeepSpeed engine configuration built from the spec's `train` section.

CPU (what runs here): gloo, fp32, ZeRO 0-3 without offload, `DS_ACCELERATOR=cpu`.
GPU (selected by `use_gpu: true`): NCCL, bf16 by default, optional CPU/NVMe offload.
"""

from __future__ import annotations

from workers.config import TrainSpec


def build_ds_config(train: TrainSpec, world_size: int) -> dict:
    micro = train.global_batch_size // (world_size * train.grad_accum)
    if micro * world_size * train.grad_accum != train.global_batch_size:
        raise ValueError(
            f"global_batch_size {train.global_batch_size} is not divisible by "
            f"{world_size} workers x {train.grad_accum} accumulation steps"
        )
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        zero.update(
            contiguous_gradients=True,
            overlap_comm=train.use_gpu,
            reduce_scatter=True,
            allgather_partitions=True,
        )
    if train.zero_stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if train.offload != "none":
        device = train.offload
        target: dict = {"device": device, "pin_memory": True}
        if device == "nvme":
            target["nvme_path"] = train.nvme_path
        zero["offload_optimizer"] = dict(target)
        if train.zero_stage == 3:
            zero["offload_param"] = dict(target)
    cfg: dict = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": train.grad_accum,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if train.max_grad_norm is not None:
        cfg["gradient_clipping"] = train.max_grad_norm
    precision = train.resolved_precision()
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return cfg


def worker_env(train: TrainSpec) -> dict[str, str]:
    """Environment every training worker needs before DeepSpeed is imported."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    if not train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    threads = str(train.threads_per_worker or max(1, int(train.worker_resources().get("CPU", 1))))
    env["OMP_NUM_THREADS"] = threads
    return env
