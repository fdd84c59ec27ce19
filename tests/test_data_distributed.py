"""Two CPU processes (torchrun + accelerate MULTI_CPU): the main process builds the caches, the other loads them.

Slow (two interpreters import torch/diffusers): runs with FLOW_LUNE_SLOW=1. DESIGN.md section 9: on these
machines ``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2`` is what gives accelerate two processes.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

WORKER = """
import json, os, sys
import torch
from accelerate import Accelerator
from flow_lune.tiny import SD15_SCHEDULER_CONFIG, tiny_sd_components
from flow_lune.training.data import DataConfig, prepare_training_data
from flow_lune.training.models import TeacherComponents

accelerator = Accelerator(cpu=True)
c = tiny_sd_components(0)
calls = []
forward = c.unet.forward
c.unet.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
parts = TeacherComponents(c.unet, c.vae, c.text_encoder, c.tokenizer, SD15_SCHEDULER_CONFIG)
cfg = DataConfig(num_generated=4, generation_steps=2, resolution=32, cache_dir=sys.argv[1])
ds = prepare_training_data(cfg, parts, accelerator)
x = torch.stack([ds[i]["latents"] for i in range(len(ds))])
out = dict(rank=accelerator.process_index, world=accelerator.num_processes, unet_calls=len(calls),
           path=str(ds.latents_cache.path), checksum=float(x.double().sum()))
with open(os.path.join(sys.argv[2], f"rank{out['rank']}.json"), "w") as f:
    json.dump(out, f)
"""


@pytest.mark.slow
def test_two_processes_share_one_cache(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not on PATH")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    subprocess.run([*cmd, str(tmp_path / "cache"), str(tmp_path)], env=env, check=True, timeout=600)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["unet_calls"] > 0 and ranks[1]["unet_calls"] == 0  # only the main process generated
    assert ranks[0]["path"] == ranks[1]["path"] and ranks[0]["checksum"] == ranks[1]["checksum"]
    caches = sorted(p.name.split("-")[0] for p in (tmp_path / "cache").iterdir() if p.name != "datasets")
    assert caches == ["embeds", "latents"]  # one set, no leftover temporary folders
