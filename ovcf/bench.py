"""`python -m ovcf.bench` (`make bench`): training throughput of the pipeline vs a bare PyTorch loop.

Both train the same network on the same in-memory tensors (the default cohort's training set,
generated on first use) with the same batch size and optimizer; the ratio is what Lightning,
the DataModule and the metrics cost per sample.
"""

from __future__ import annotations

import argparse
import time

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ovcf.cli import config_dir
from ovcf.data import CohortDataModule
from ovcf.models import create_model
from ovcf.tasks import ClassificationTask


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _StepTimer(L.Callback):
    """Times training steps after `warmup` steps."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.samples = warmup, None, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            _sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.start is not None:
            self.samples += len(batch["label"])

    def on_train_end(self, trainer, module):
        _sync()
        self.seconds = time.perf_counter() - self.start


def bench_pipeline(dm: CohortDataModule, model_name: str, kwargs: dict, steps: int, warmup: int, args) -> float:
    L.seed_everything(0)
    timer = _StepTimer(warmup)
    trainer = L.Trainer(
        max_steps=steps + warmup,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        accelerator=args.accelerator,
        devices=1,
        precision=args.precision,
    )
    trainer.fit(ClassificationTask(model_name, kwargs), datamodule=dm)
    return timer.samples / timer.seconds


def bench_bare(dm: CohortDataModule, model_name: str, kwargs: dict, steps: int, warmup: int, args) -> float:
    torch.manual_seed(0)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    net = create_model(model_name, task="classification", **kwargs).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision.startswith("bf16"))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    ds = dm.datasets["train"]
    bs = dm.hparams.batch_size
    n = len(ds)
    net.train()
    samples, start = 0, None
    for step in range(steps + warmup):
        if step == warmup:
            _sync()
            start = time.perf_counter()
        idx = torch.randint(0, n, (bs,))
        x, y = ds.images[idx].to(device), ds.labels[idx].to(device)  # the loader's copy, as Lightning does
        with autocast:
            loss = loss_fn(net(x).reshape(-1).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if start is not None:
            samples += bs
    _sync()
    return samples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="densenet121", help="a model config name (conf/model)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    parser.add_argument("--smoke", action="store_true", help="use the tiny debug cohort instead of the default one")
    parser.add_argument("--augment", action="store_true", help="keep the training augmentation (the bare loop has none)")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"model={args.model}", f"data.batch_size={args.batch_size}", "paths.output_dir=."]
            + (["debug=smoke"] if args.smoke else [])
            + ([] if args.augment else ["data/augment=none"]),
        )
    dm: CohortDataModule = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    kwargs = OmegaConf.to_container(cfg.model.model_kwargs, resolve=True)
    pipeline = bench_pipeline(dm, cfg.model.model_name, kwargs, args.steps, args.warmup, args)
    bare = bench_bare(dm, cfg.model.model_name, kwargs, args.steps, args.warmup, args)
    where = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"{torch.get_num_threads()} CPU threads"
    augment = "with" if args.augment else "without"
    print(f"model {args.model}, batch {args.batch_size}, {args.precision}, {augment} augmentation, {args.steps} steps on {where}")
    print(f"  pipeline (Lightning + DataModule + metrics): {pipeline:8.1f} samples/s")
    print(f"  bare PyTorch loop, same model and tensors:   {bare:8.1f} samples/s")
    print(f"  ratio pipeline / bare: {pipeline / bare:.3f}  (overhead {100 * (1 - pipeline / bare):+.1f}%)")


if __name__ == "__main__":
    main()
