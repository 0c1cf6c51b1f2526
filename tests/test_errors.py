"""Bad input ends with one line naming the problem and the fix, never a traceback."""

from __future__ import annotations

import pytest
from conftest import run_cli


def _one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-2000:]
    return errors[0]


def test_unknown_model_name(cli_env, tmp_path):
    line = _one_line_error(run_cli("ovcf.train", ["model=resnet"], cli_env, tmp_path))
    assert "resnet" in line and "densenet121" in line and "densenet121_3d" in line


def test_unknown_model_in_a_multirun_list(cli_env, tmp_path):
    line = _one_line_error(run_cli("ovcf.train", ["-m", "model=densenet121,vgg99"], cli_env, tmp_path))
    assert "vgg99" in line


def test_unknown_network_name_in_model_config(cli_env, tmp_path):
    line = _one_line_error(run_cli("ovcf.train", ["model.model_name=resnet", "logger=csv"], cli_env, tmp_path))
    assert "unknown classification model 'resnet'" in line and "densenet121" in line and "umamba" not in line


def _imported(proc) -> set[str]:
    """The modules a command run with PYTHONPROFILEIMPORTTIME=1 imported (Python lists them on stderr)."""
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("command", ["ovcf.train", "ovcf.ingest"])
def test_missing_cohort_folder(cli_env, tmp_path, command):
    """Named before torch and Lightning load (half a minute on a small CPU): a typo fails in a second."""
    args = [f"data.cohort={tmp_path / 'nope'}", "logger=csv"] if command == "ovcf.train" else [f"cohort={tmp_path / 'nope'}"]
    proc = run_cli(command, args, cli_env | {"PYTHONPROFILEIMPORTTIME": "1"}, tmp_path)
    line = _one_line_error(proc)
    assert str(tmp_path / "nope") in line and "data.cohort" in line and "cohort=" in line
    assert not {"torch", "lightning"} & _imported(proc)


def test_missing_required_column(cli_env, tmp_path):
    cohort = tmp_path / "cohort"
    (cohort / "dicom").mkdir(parents=True)
    (cohort / "clinical.csv").write_text("patient_id,center,age,sex,dxa_t_score,mri_date,level\n1,A,70,F,-3,2020-01-01,L1\n")
    line = _one_line_error(run_cli("ovcf.train", [f"data.cohort={cohort}", "logger=csv"], cli_env, tmp_path))
    assert "clinical.csv" in line and "label" in line


@pytest.mark.parametrize("override", ["data.dev_center=CQMU", "data.external_center=CQMU"])
def test_wrong_center_name_lists_the_centers(cli_env, tmp_path, tiny_cohort, override):
    env = cli_env | {"PYTHONPROFILEIMPORTTIME": "1"}
    proc = run_cli("ovcf.train", [f"data.cohort={tiny_cohort}", override, "logger=csv"], env, tmp_path)
    line = _one_line_error(proc)
    assert "CQMU" in line and "A, B" in line and "torch" not in _imported(proc)
