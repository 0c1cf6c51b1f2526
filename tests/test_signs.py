"""Sign supervision: the `signs` column through ingest, the masked sign loss, heads that learn, pretrain and predict."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import run_cli
from safetensors import safe_open
from test_clinical import HEADER, PID, _line, _write

from ovcf.contract import SIGNS
from ovcf.data.clinical import read_clinical
from ovcf.data.datamodule import VertebraDataset
from ovcf.data.ingest import ingest, read_index
from ovcf.data.roi import RoiSpec
from ovcf.errors import CohortError, ConfigError
from ovcf.eval.metrics import binary_scores
from ovcf.inference.models import load_classifier
from ovcf.inference.patient import _summary_rows, call_text, classify
from ovcf.models import create_model
from ovcf.tasks import ClassificationTask

TINY = {"channels": [8, 16], "dim": 32, "max_slices": 16}  # a slice transformer small enough for a unit test


def test_ingest_carries_the_signs_column_and_refuses_an_unknown_sign(tmp_path):
    cohort = tmp_path / "cohort"
    (cohort / "dicom").mkdir(parents=True)
    lines = [_line(level="L1"), _line(level="L2"), _line(level="L3")]
    _write(cohort, lines)
    roi, cache = RoiSpec(16, 2.0), tmp_path / "cache"
    index = read_index(ingest(cohort, cache, roi, tmp_path / "key", progress=False))
    assert [r["signs"] for r in index] == [None, None, None]  # no column: no sign labels

    # The column added to the same cohort reaches the index (the cache is indexed again).
    cells = ["Vacuum_Cleft; osteophytes", "", "?"]
    _write(cohort, [f"{line},{cell}" for line, cell in zip(lines, cells)], HEADER + ",signs")
    index = read_index(ingest(cohort, cache, roi, tmp_path / "key", progress=False))
    assert [r["signs"] for r in index] == [["osteophytes", "vacuum_cleft"], [], None]

    _write(cohort, [f"{lines[0]},fracture_lines", f"{lines[1]},fracture_line;halo"], HEADER + ",signs")
    with pytest.raises(CohortError) as err:
        read_clinical(cohort / "clinical.csv")
    message = str(err.value)
    assert "clinical.csv" in message and "row(s) 2 " in message and "halo" not in message and PID not in message
    assert all(name in message for name in SIGNS)


def test_rows_without_sign_labels_add_nothing_to_the_loss():
    torch.manual_seed(0)
    task = ClassificationTask("transformer", TINY, sign_heads=True, sign_weight=0.5)
    logits = torch.randn(4, len(SIGNS), requires_grad=True)
    signs = torch.randint(0, 2, (4, len(SIGNS))).float()
    known = torch.tensor([True, False, True, False])
    other = signs.clone()
    other[~known] = 1 - other[~known]  # the unknown rows' (meaningless) labels changed
    assert torch.equal(task.sign_loss(logits, signs, known), task.sign_loss(logits, other, known))
    assert task.sign_loss(logits, signs, known) > 0

    batch = {"image": torch.rand(4, 1, 16, 16, 16), "label": torch.tensor([0.0, 1, 0, 1]), "clinical": torch.zeros(4, 3)}
    batch |= {"signs": signs, "signs_known": torch.zeros(4, dtype=torch.bool)}
    task.eval()  # no dropout: both losses see the same logits
    acute = task.loss(task.logits(batch), batch["label"])
    total = task.training_step(batch, 0)  # no known row: the acute BCE alone, and it still backpropagates
    assert torch.allclose(total, acute)
    total.backward()
    assert task.sign_head.weight.grad is not None and not bool(task.signs_learned)
    assert task.sign_probabilities(batch["image"]) is None  # heads that never saw a label report nothing


def _sign_dataset(n: int, seed: int) -> VertebraDataset:
    """Noise cubes; half carry a bright band (the 'impaction band'), a third of those also a dark cleft."""
    rng = np.random.default_rng(seed)
    images = rng.normal(200.0, 60.0, (n, 16, 16, 16)).astype(np.float32)
    rows = []
    for i in range(n):
        signs = []
        if i % 2:
            images[i, :, 6:8, :] += 600.0
            signs.append("impaction_band")
        if i % 3 == 0:
            images[i, 4:12, 10:12, 4:12] -= 900.0
            signs.append("vacuum_cleft")
        rows.append({"pseudonym": f"P{i}", "level": "L1", "label": "acute" if i % 2 else "chronic", "age": 70.0})
        rows[-1] |= {"sex": "F", "dxa_t_score": -2.5, "signs": signs if i % 4 else None}  # a quarter unlabelled
    return VertebraDataset(rows, images, np.ones((n, 16, 16, 16), np.uint8), (-250, 1250))


def test_sign_heads_learn_a_visible_sign():
    torch.manual_seed(0)
    train, test = _sign_dataset(48, 0), _sign_dataset(24, 1)
    task = ClassificationTask("transformer", TINY, sign_heads=True, lr=3e-3)
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=16, shuffle=True)
    task.train()
    for _ in range(30):
        for batch in loader:
            opt.zero_grad()
            task.training_step(batch, 0).backward()
            opt.step()
    task.eval()
    probs = task.sign_probabilities(test.images)
    for name in ("impaction_band", "vacuum_cleft"):
        j = SIGNS.index(name)
        assert binary_scores(test.signs[:, j].int(), probs[:, j])["auroc"] > 0.9, name


@pytest.mark.slow(seconds=50)
def test_pretrain_writes_weights_that_finetuning_and_predict_use(tiny_cohort, cli_env, tmp_path):
    out = tmp_path / "pre.safetensors"
    args = ["debug=smoke", f"data.cohort={tiny_cohort}", "data.roi_size=32", "data.val_fraction=0.5", "data.progress=false"]
    args += ["model=transformer", "trainer.max_epochs=1", f"pretrain.out={out}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = run_cli("ovcf.pretrain", args, cli_env, tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"model.model_kwargs.weights={out}" in proc.stdout and "model=transformer" in proc.stdout
    results = json.loads((tmp_path / "run" / "train" / "results.json").read_text())
    assert 0.0 <= results["val"]["sign_auroc"] <= 1.0
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert meta["model_name"] == "transformer" and json.loads(meta["signs"]) == list(SIGNS)
    assert json.loads(meta["roi"])["roi_size"] == 32

    # Fine-tuning starts from the file: the encoder and the sign heads are the pretrained ones.
    trained, _ = load_classifier(tmp_path / "run" / "train" / results["best_checkpoint"])
    kwargs = json.loads(meta["model_kwargs"])
    encoder = create_model("transformer", weights=str(out), **kwargs)
    assert all(torch.equal(v, trained.net.state_dict()[k]) for k, v in encoder.state_dict().items())
    task = ClassificationTask("transformer", kwargs | {"weights": str(out)}, sign_heads=True)
    assert torch.equal(task.sign_head.weight, trained.sign_head.weight) and bool(task.signs_learned)
    with pytest.raises(ConfigError, match=f"{out}.*holds a transformer encoder"):
        create_model("vgg16_3d", weights=str(out))

    # Predict reports the signs next to the acute probability; a fold ensemble averages them, and a
    # member without sign heads adds none.
    plain = ClassificationTask("transformer", kwargs).eval()
    system = SimpleNamespace(classifiers=[trained, plain], pre={"hu_window": [-250, 1250], "in_channels": 1})
    rois = {lv: (np.full((32, 32, 32), 300.0, np.float32), np.ones((32, 32, 32), np.uint8)) for lv in ("L1", "L2")}
    clinical = {"age": 70.0, "sex": "F", "dxa_t_score": -2.5}
    probs, _, ds, signs = classify(system, rois, "P", clinical)
    assert set(signs) == {"L1", "L2"} and list(signs["L1"]) == list(SIGNS)
    assert np.allclose(list(signs["L1"].values()), trained.sign_probabilities(ds.images[:1])[0].numpy(), atol=1e-5)
    entry = {"level": "L1", "status": "classified", "probability": probs["L1"], "decision": "acute", "signs": signs["L1"]}
    assert call_text(entry).startswith(f"L1 acute (p={probs['L1']:.2f}; ")
    row = _summary_rows({"pseudonym": "P", "seconds": 1.0, "levels": [entry]})[0]
    assert row["p_vacuum_cleft"] == signs["L1"]["vacuum_cleft"]
    system.classifiers = [plain]
    assert classify(system, rois, "P", clinical)[3] == {}
