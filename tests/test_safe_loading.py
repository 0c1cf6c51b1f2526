"""A system folder or checkpoint handed over by someone else runs no code when it is loaded.

The payload is a real one: a pickle whose `__reduce__` writes a marker file. Each test first
proves that plain unpickling runs it (so the test can fail), then that ovcf's loaders refuse the
file in one line that names it and that the marker never appears.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_cfg, run_cli

from ovcf.errors import ConfigError


class _Payload:
    """Unpickling this calls `exec`, which writes the marker: what an attacker would put in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def _plant(path: Path, marker: Path) -> Path:
    """A checkpoint-shaped pickle with the payload inside its hyper-parameters, written to `path`."""
    torch.save({"state_dict": {}, "hyper_parameters": {"clinical": False, "x": _Payload(marker)}}, path)
    probe = shutil.copy(path, path.parent / "probe.pt")  # torch.load reads a `.safetensors` name as safetensors
    torch.load(probe, weights_only=False)  # the payload is live: plain unpickling runs it
    assert marker.read_text() == "ran"
    marker.unlink()
    Path(probe).unlink()
    return path


@pytest.fixture(scope="module")
def exported(smoke_study) -> Path:
    return smoke_study.folder / "system"


def _copy(system: Path, tmp: Path) -> tuple[Path, dict]:
    folder = shutil.copytree(system, tmp / "system")
    return folder, json.loads((folder / "configs" / "inference.json").read_text())


def test_the_exported_system_holds_no_pickle_and_loads_the_trained_weights(exported, smoke_study):
    """Weights are safetensors, everything else JSON; loaded models equal the runs' checkpoints."""
    from ovcf.inference.models import load_classifier, load_segmenter
    from ovcf.inference.system import load_system

    files = sorted(p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file())
    assert all(f.endswith((".safetensors", ".json", ".md")) for f in files), files
    for f in (p for p in exported.rglob("*.safetensors")):
        assert f.read_bytes()[8:9] == b"{"  # safetensors: an 8-byte header length, then the JSON header
    system = load_system(exported)
    chosen = json.loads((smoke_study.folder / "study.json").read_text())["chosen"]
    seg, _ = load_segmenter(chosen["segmenter"]["checkpoint"])
    for name, tensor in seg.state_dict().items():
        assert torch.equal(system.segmenter.state_dict()[name], tensor), name
    from ovcf.inference.runs import run_members

    members = run_members(Path(chosen["classifier"]["run"]))
    for (_, ckpt), loaded in zip(members, system.classifiers, strict=True):
        task, _ = load_classifier(ckpt)
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in task.state_dict().items())


def test_a_crafted_model_file_runs_nothing(exported, tmp_path):
    """`ovcf.predict system=DIR` with a pickle planted as the segmenter: one line naming it, no payload run."""
    folder, _ = _copy(exported, tmp_path)
    marker = tmp_path / "payload_ran"
    _plant(folder / "models" / "segmenter.safetensors", marker)
    proc = run_cli(
        "ovcf.predict",
        [f"system={folder}", f"input={tmp_path}", f"output={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'h'}"],
        {**os.environ, "WANDB_MODE": "disabled"},
        tmp_path,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "segmenter.safetensors" in lines[0] and "not a safetensors" in lines[0]
    assert not marker.exists()


@pytest.mark.parametrize("where", ["absolute", "dotdot", "link"])
def test_a_model_file_outside_the_folder_is_refused(exported, tmp_path, where):
    """`inference.json` may only name files inside the system folder: an absolute path, `..` or a link out is refused."""
    from ovcf.inference.system import load_system

    folder, inference = _copy(exported, tmp_path)
    marker = tmp_path / "payload_ran"
    evil = _plant(tmp_path / "evil.ckpt", marker)
    name = {"absolute": str(evil), "dotdot": "../evil.ckpt", "link": "models/link.safetensors"}[where]
    if where == "link":
        (folder / "models" / "link.safetensors").symlink_to(evil)
    inference["classifier"]["members"][0]["file"] = name
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    with pytest.raises(ConfigError, match="outside the system folder") as err:
        load_system(folder)
    assert "inference.json" in str(err.value) and "\n" not in str(err.value)
    assert not marker.exists()


def test_an_old_pickled_system_is_refused_unread(exported, tmp_path):
    """A format-1 folder (pickled .ckpt models) is refused before any model file is opened."""
    from ovcf.inference.system import load_system

    folder, inference = _copy(exported, tmp_path)
    marker = tmp_path / "payload_ran"
    _plant(folder / "models" / "segmenter.ckpt", marker)
    inference["format"], inference["segmenter"]["file"] = 1, "models/segmenter.ckpt"
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    with pytest.raises(ConfigError, match="format 1.*export it again"):
        load_system(folder)
    assert not marker.exists()


def test_a_crafted_checkpoint_is_refused_by_every_loader(tmp_path):
    """evaluate/export/segment/sign ablation (`load_classifier`, `load_segmenter`) and train's resume read a
    checkpoint with the weights-only loader: a payload is refused in one line naming the file, and never runs."""
    from ovcf.inference.models import load_classifier, load_segmenter
    from ovcf.training import resume_from

    marker = tmp_path / "payload_ran"
    evil = _plant(tmp_path / "epoch_001.ckpt", marker)
    for load in (load_classifier, load_segmenter):
        with pytest.raises(ConfigError, match="refused.*could run code") as err:
            load(evil)
        assert str(evil) in str(err.value)
    cfg = compose_cfg("train", [f"ckpt_path={evil}"], tmp_path)
    with pytest.raises(ConfigError, match="epoch_001.ckpt refused"):
        resume_from(cfg, tmp_path)
    assert not marker.exists()
