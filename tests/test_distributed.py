"""DDP on CPU: two gloo processes, each loading half the global batch, train the model one process would."""

from __future__ import annotations

import json

import lightning
import pytest
import torch
from conftest import run_cli

from ovcf.tasks import ClassificationTask


@pytest.mark.slow(seconds=137)
def test_ddp_on_cpu_matches_one_process(tmp_path, tiny_cohort, cli_env):
    # vit_3d without its convolutional stem has no batch norm (CPU processes cannot synchronise it)
    args = [
        "debug=smoke",
        "model=vit_3d",
        "model.model_kwargs.conv_stem=false",
        f"data.cohort={tiny_cohort}",
        "data.val_fraction=0.5",
        "data.roi_size=32",
        "trainer.max_epochs=3",
        "model.lr=1e-3",
        "data.batch_size=2",  # the tiny cohort trains on 3 vertebrae: one whole global batch of 2 per epoch
    ]
    env = {**cli_env, "OMP_NUM_THREADS": "1"}
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.strategy=ddp_spawn", "trainer.sync_batchnorm=false"]
    runs = {}
    for name, extra in (("one", []), ("ddp", [*ddp, "trainer.precision=32-true"])):
        proc = run_cli("ovcf.train", [*args, *extra, f"hydra.run.dir={tmp_path / name}"], env, tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = proc
    assert "MEMBER: 2/2" in runs["ddp"].stdout + runs["ddp"].stderr, "two processes trained"
    one, two = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("one", "ddp"))
    for stage in ("val", "test"):
        for key, value in one[stage].items():
            assert two[stage][key] == pytest.approx(value, abs=1e-4), f"{stage}/{key}"
    ckpts = {n: torch.load(tmp_path / n / "checkpoints" / "last.ckpt", weights_only=False) for n in runs}
    lightning.seed_everything(0)  # as ovcf.train does before building the model: its initial weights
    start = ClassificationTask(**ckpts["one"]["hyper_parameters"]).state_dict()
    one, two = ckpts["one"]["state_dict"], ckpts["ddp"]["state_dict"]
    weights = [k for k in start if start[k].is_floating_point()]  # not the sign heads' signs_learned flag
    moved = max((one[k] - start[k]).abs().max().item() for k in weights)
    gap = max((one[k] - two[k]).abs().max().item() for k in weights)
    assert moved > 1e-4, "training changed the weights"
    assert gap < 0.05 * moved, f"DDP weights differ by {gap:.2e} from one process's (training moved them {moved:.2e})"


def test_ranks_share_out_the_global_batches_of_one_process(monkeypatch):
    """The EpochSampler of each of 2 ranks, batched by 8 / 2, rebuilds the batches of 8 one process draws."""
    import ovcf.data.sampling as sampling

    sampler = sampling.EpochSampler(37, seed=5, batch_size=8)
    sampler.set_epoch(3)
    single = [i for i, _ in sampler]
    assert len(single) == 32 and len(set(single)) == 32, "whole batches of distinct samples"
    batches = [single[k : k + 8] for k in range(0, 32, 8)]
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(sampling, "world", lambda rank=rank: (rank, 2))
        keys = list(sampler)
        assert len(keys) == len(sampler) == 16 and all(epoch == 3 for _, epoch in keys)
        shares.append([i for i, _ in keys])
    for t, batch in enumerate(batches):
        assert sorted(shares[0][t * 4 : t * 4 + 4] + shares[1][t * 4 : t * 4 + 4]) == sorted(batch)
    monkeypatch.setattr(sampling, "world", lambda: (0, 1))
    assert [i for i, _ in sampler] == single, "the same epoch, the same order (a resumed run)"
    sampler.set_epoch(4)
    assert [i for i, _ in sampler] != single
    weighted = sampling.EpochSampler(6, seed=0, batch_size=3, weights=torch.tensor([1.0, 0, 0, 0, 0, 1.0]))
    assert {i for i, _ in weighted} <= {0, 5}
