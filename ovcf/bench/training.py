"""`python -m ovcf.bench.training`: training throughput of the pipeline vs a bare PyTorch loop.

Both train the same network on the same in-memory tensors (the default cohort's training set,
generated on first use) with the same batch size and optimizer; the ratio is what Lightning,
the DataModule, the metrics and, with it on, the training augmentation cost per sample. The
pipeline runs once per augmentation engine asked for: none, batch (on the training device) and
torchio (per sample in the loader). A segmenter (`--model unet,umamba,unetr_pp`, or `segmenters`)
trains on the patches its DataModule draws, the bare loop on patches drawn beforehand with the
task's own loss; segmenters train without augmentation, so they run once.

`--repeats R` measures the bare loop and each pipeline R times in turn and reports medians, the
ratio's range beside: on a shared virtual machine one model's bare loop moved from 36 to 68
samples/s between runs minutes apart, more than any change measured here.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from ovcf.cli import config_dir, resolve_cohort, setup_logging
from ovcf.data import CohortDataModule
from ovcf.models import list_models
from ovcf.models.registry import model_task
from ovcf.tasks import ClassificationTask

log = logging.getLogger(__name__)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _StepTimer(L.Callback):
    """Times training steps after `warmup` steps, and the share of that time spent between steps
    (the loader producing the next batch: what the accelerator waits for)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.samples, self.wait, self.last_end = warmup, None, 0, 0.0, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == self.warmup and self.start is None:
            _sync()
            self.start = time.perf_counter()
        elif self.start is not None and self.last_end is not None:
            self.wait += time.perf_counter() - self.last_end

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.start is not None:
            self.samples += len(batch["label"])
            _sync()
            self.last_end = time.perf_counter()

    def on_train_end(self, trainer, module):
        _sync()
        self.seconds = time.perf_counter() - self.start


def _task(model_cfg, args) -> L.LightningModule:
    """The model config's task (a classifier's with its defaults, as before; a segmenter's as configured)."""
    if model_task(model_cfg.model_name) == "segmentation":
        task = hydra.utils.instantiate(model_cfg)
    else:
        task = ClassificationTask(model_cfg.model_name, OmegaConf.to_container(model_cfg.model_kwargs, resolve=True))
    return torch.compile(task) if args.compile else task


def bench_pipeline(dm: CohortDataModule, model_cfg, steps: int, warmup: int, args) -> tuple[float, float]:
    """Samples/s of `trainer.fit`, and the share of step time spent waiting for data."""
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
    trainer.fit(_task(model_cfg, args), datamodule=dm)
    return timer.samples / timer.seconds, timer.wait / timer.seconds


def bench_bare(dm: CohortDataModule, model_cfg, steps: int, warmup: int, args) -> float:
    torch.manual_seed(0)
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    net = _task(model_cfg, args).to(device)  # the same encoder and head as the pipeline
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision.startswith("bf16"))
    loss_fn = torch.nn.BCEWithLogitsLoss()
    ds = dm.datasets["train"]
    bs = dm.hparams.batch_size
    segmenter = model_task(model_cfg.model_name) == "segmentation"
    if segmenter:  # patches drawn beforehand, each batch a slice of them
        patches = [ds[i] for i in range(min(len(ds), 8 * bs))]
        images, labels = (torch.stack([p[k] for p in patches]) for k in ("image", "label"))
    else:
        images, labels = ds.images, ds.labels
    n = len(images)
    net.train()
    samples, start = 0, None
    for step in range(steps + warmup):
        if step == warmup:
            _sync()
            start = time.perf_counter()
        idx = torch.randint(0, n, (bs,))
        x, y = images[idx].to(device), labels[idx].to(device)  # the loader's copy, as Lightning does
        with autocast:
            if segmenter:
                loss = net.training_loss({"image": x, "label": y})[0]
            else:
                loss = loss_fn(net(x).reshape(-1).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if start is not None:
            samples += bs
    _sync()
    return samples / (time.perf_counter() - start)


def _datamodule(data) -> CohortDataModule:
    """The data config `data` instantiated, its cohort ingested and its sets built."""
    dm = hydra.utils.instantiate(data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model",
        default="densenet121",
        help="model config names (conf/model), comma-separated; all: every classifier; segmenters: every segmenter",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model in both loops")
    parser.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    parser.add_argument("--smoke", action="store_true", help="use the tiny debug cohort instead of the default one")
    parser.add_argument(
        "--augment",
        default="none,batch,torchio",
        help="augmentation engines of the pipeline runs, comma-separated: none, batch, torchio (the bare loop has none)",
    )
    parser.add_argument("--repeats", type=int, default=1, help="rounds of bare loop and pipelines; medians reported")
    args = parser.parse_args(argv)
    setup_logging()  # a benchmark is a command Hydra does not start: its console is set up here
    groups = {"all": list_models("classification"), "segmenters": list_models("segmentation")}
    models = groups.get(args.model) or args.model.split(",")
    engines = args.augment.split(",")
    if not set(engines) <= {"none", "batch", "torchio"}:
        parser.error(f"--augment {args.augment}: use none, batch and/or torchio, comma-separated")
    where = torch.cuda.get_device_name() if args.accelerator == "gpu" else f"{torch.get_num_threads()} CPU threads"
    compiled = ", torch.compile" if args.compile else ""
    log.info(f"batch {args.batch_size} (segmenters: their own), {args.precision}{compiled}, {args.steps} steps, {where}")
    log.info(f"{'model':<16}{'augment':<9}{'pipeline/s':>12}{'bare/s':>10}{'ratio':>8}{'data wait':>11}")
    modules = {}
    for name in models:
        task = model_task(name) or "classification"
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=[f"task={task}", f"model={name}", "paths.output_dir=."]
                + ([f"data.batch_size={args.batch_size}"] if task == "classification" else [])
                + [f"data.num_workers={args.num_workers}"]
                + (["debug=smoke"] if args.smoke else []),
            )
        resolve_cohort(cfg)
        if task == "segmentation":  # its own patches, no augmentation
            todo = {"none": _datamodule(cfg.data)}
        else:  # one data module per engine, shared by every classifier: the same tensors
            for engine in [e for e in engines if e not in modules]:
                data = cfg.data.copy()
                data.augment_engine = "torchio" if engine == "none" else engine
                data.augment_strength = 0.0 if engine == "none" else data.augment_strength
                modules[engine] = _datamodule(data)
            todo = modules
        model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
        rounds = []  # per round: (bare, {engine: (pipeline, wait)}), the bare loop beside the pipelines it is read against
        for _ in range(max(1, args.repeats)):
            bare = bench_bare(next(iter(todo.values())), model_cfg, args.steps, args.warmup, args)
            rounds.append((bare, {e: bench_pipeline(dm, model_cfg, args.steps, args.warmup, args) for e, dm in todo.items()}))
        bare = statistics.median(b for b, _ in rounds)
        for engine in todo:
            pipeline = statistics.median(r[engine][0] for _, r in rounds)
            wait = statistics.median(r[engine][1] for _, r in rounds)
            ratios = [r[engine][0] / b for b, r in rounds]
            spread = f"  ({min(ratios):.3f}-{max(ratios):.3f})" if len(rounds) > 1 else ""
            log.info(
                f"{name:<16}{engine:<9}{pipeline:12.1f}{bare:10.1f}{statistics.median(ratios):8.3f}{100 * wait:10.1f}%{spread}"
            )
    log.info("pipeline: Lightning + DataModule + metrics; bare: a PyTorch loop over the same model and in-memory tensors")
    if args.repeats > 1:
        log.info(f"medians of {args.repeats} rounds, each a bare loop then the pipelines; ratio: the rounds' median (range)")
    log.info(
        "data wait: share of the pipeline's step time spent between steps (the loader producing the next batch, "
        "and the batched augmentation)"
    )


if __name__ == "__main__":
    main()
