"""`python -m ovcf.bench.segmenters`: training-step throughput of the three segmenters, fp32 and bf16 autocast.

Each model takes its default config (`conf/model/<name>.yaml`); one step is forward, DiceCE plus the
slab classifier's cross-entropy, backward and AdamW on a batch of random patches. On a GPU it also says whether U-Mamba ran
`mamba_ssm`'s CUDA kernel or the pure-PyTorch selective scan.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch
from omegaconf import OmegaConf

from ovcf.cli import config_dir, setup_logging
from ovcf.models import umamba
from ovcf.tasks import SegmentationTask

log = logging.getLogger(__name__)

MODELS = ("unet", "unetr_pp", "umamba")


def step_rate(name: str, device: str, precision: str, batch: int, steps: int, patch=None) -> dict:
    cfg = OmegaConf.to_container(OmegaConf.load(f"{config_dir()}/model/{name}.yaml"))
    patch = list(patch or cfg["patch_size"])
    task = SegmentationTask(model_name=name, model_kwargs=cfg["model_kwargs"], patch_size=patch, lr=cfg["lr"]).to(device)
    task.train()
    opt = torch.optim.AdamW(task.parameters(), lr=cfg["lr"])
    image = torch.rand(batch, 1, *patch, device=device)
    label = torch.randint(0, task.num_regions, (batch, 1, *patch), device=device)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def one():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            loss = task.training_loss({"image": image, "label": label})[0]
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: cuDNN autotuning, allocator
        one()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    return {
        "model": name,
        "device": device,
        "precision": precision,
        "batch": batch,
        "patch": patch,
        "s_per_step": round(seconds, 4),
        "patches_per_s": round(batch / seconds, 1),
        "params_m": round(sum(p.numel() for p in task.parameters()) / 1e6, 2),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--patch", type=int, nargs=3, default=None, help="default: each model's patch_size")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    setup_logging()  # a benchmark is a command Hydra does not start: its console is set up here
    kernel = umamba._kernel_scan is not None and args.device.startswith("cuda")
    log.info(f"device {args.device}; mamba_ssm CUDA kernel: {'used' if kernel else 'absent (pure-PyTorch selective scan)'}")
    rows = []
    for name in args.models:
        for precision in args.precision:
            row = step_rate(name, args.device, precision, args.batch, args.steps, args.patch)
            rows.append(row)
            log.info(
                f"{name:>9} {precision:>4}: {row['s_per_step']:.4f} s/step, {row['patches_per_s']:.1f} patches/s "
                f"(batch {row['batch']} x {row['patch']}, {row['params_m']} M params)"
            )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
