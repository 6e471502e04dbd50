"""`adapterflow up`: a persistent local Ray head whose warm workers run 2-worker DeepSpeed jobs. A job on
warm workers reproduces the recorded Ray Train run (the golden 2-worker case: same losses, same saved
weights, same metrics, to float32 rounding); the next job reuses the processes (they predate it, their imports
done) and gives the same again; a warm worker killed mid-run is replaced and the run resumes from its
newest complete checkpoint (train.max_failures) to the uninterrupted result; `down` stops the head."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from golden import METRICS, assert_recorded, spec_dict, weight_files
from helpers import ROOT, spec_for

pytestmark = pytest.mark.slow


def _env(home) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ADAPTERFLOW_HOME": str(home)}
    env.pop("ADAPTERFLOW_NO_UP", None)
    return env


def _cli(env, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _train(env, spec_path, out):
    _cli(env, "train", spec_path, "--no-register", "--json", out)
    return json.loads(out.read_text())


def _write(path, data: dict):
    path.write_text(yaml.safe_dump(data))
    return path


def test_warm_workers_reproduce_ray_train_reuse_and_resume(tiny_llama, toy_data, tmp_path):
    env = _env(tmp_path / "home")
    golden_spec = _write(tmp_path / "golden.yaml", spec_dict("lora-2-workers", tiny_llama, toy_data, None, None,
                                                             tmp_path))
    # 60 steps (a few seconds): long enough to kill a worker after its first complete checkpoint
    long_spec = _write(tmp_path / "long.yaml", spec_for(tiny_llama, toy_data, tmp_path, num_workers=2, zero_stage=2,
                                                        epochs=4, max_steps=60, checkpoint_every=4,
                                                        max_failures=1).model_dump(mode="json"))
    up = _cli(env, "up", "--num-cpus", "2", "--no-dashboard")
    try:
        assert "2 warm workers ready" in up.stdout, up.stdout
        for i in range(2):  # the second job reuses the processes of the first
            run = _train(env, golden_spec, tmp_path / f"golden{i}.json")
            for rank in ("0", "1"):  # on warm processes: they predate the run and had imported everything
                tl = run["timeline"]["workers"][rank]
                assert {"peft", "deepspeed"} <= set(tl["preloaded"])
                assert dict(tl["marks"])["process_start"] < run["timeline"]["driver"][0][1]
            assert_recorded("lora-2-workers", weight_files(run["adapter_dir"]), [h["loss"] for h in run["history"]],
                            {k: run["report"][k] for k in METRICS if k in run["report"]})

        whole = _train(env, long_spec, tmp_path / "whole.json")
        # a warm worker dies right after the first complete checkpoint: the run resumes from the newest one
        pids = [int(p) for p in up.stdout.split("(pids ")[1].split(")")[0].split(", ")]
        results = tmp_path / "ws" / "ray_results"
        before = set(results.iterdir())
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", str(long_spec), "--no-register",
                                 "--json", str(tmp_path / "crash.json")], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline, killed_after = time.monotonic() + 600, None
        while killed_after is None and time.monotonic() < deadline and proc.poll() is None:
            complete = [d for run in set(results.iterdir()) - before for d in run.glob("checkpoint_*")
                        if (d / "adapterflow_complete.json").is_file()]
            if complete:
                os.kill(pids[1], 9)
                killed_after = max(complete)
            time.sleep(0.02)
        out, err = proc.communicate(timeout=900)
        assert killed_after is not None and proc.returncode == 0, out[-3000:] + err[-6000:]
        crashed = json.loads((tmp_path / "crash.json").read_text())
        assert crashed["train_metrics"]["resumed_from_step"] >= int(killed_after.name.split("_")[1])
        assert [h["loss"] for h in crashed["history"]] == pytest.approx([h["loss"] for h in whole["history"]],
                                                                         abs=1e-5)
        wa, wb = (load_file(str(Path(r["adapter_dir"]) / "adapter_model.safetensors")) for r in (whole, crashed))
        assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    finally:
        temp_dir = json.loads((tmp_path / "home" / "head.json").read_text())["temp_dir"]
        down = _cli(env, "down", check=False)
        shutil.rmtree(temp_dir, ignore_errors=True)  # the head's logs
    assert "stopped the Ray head" in down.stdout, down.stdout + down.stderr
    assert not (tmp_path / "home" / "head.json").exists()
    assert _cli(env, "status", check=False).returncode == 1
