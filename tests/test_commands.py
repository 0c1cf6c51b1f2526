"""The `ovcf` command and the `ovcf-<command>` scripts, and the console every command prints to.

The scripts appear only once the package is installed again (`pip install -e .`), so the tests run
the dispatcher in-process and as `python -m ovcf`, and check that each script's target imports.
"""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import run_cli

import ovcf.__main__ as dispatcher

ROOT = Path(__file__).resolve().parents[1]


def _scripts() -> dict[str, str]:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]["scripts"]


def test_every_script_is_a_command_and_resolves_to_a_callable():
    scripts = _scripts()
    assert scripts == {
        "ovcf": "ovcf.__main__:main",
        **{f"ovcf-{name}": f"{module}:main" for name, module in dispatcher.COMMANDS.items()},
    }, "[project.scripts] and ovcf.__main__.COMMANDS list the same commands"
    for target in scripts.values():
        module, attr = target.split(":")
        assert callable(getattr(importlib.import_module(module), attr)), target


def test_help_lists_each_command_in_one_line_without_loading_them():
    probe = "import sys; from ovcf.__main__ import main; main(['--help']); print(sorted(set(sys.modules) & {HEAVY}))"
    heavy = {"torch", "lightning", "hydra", "omegaconf", "numpy", "ovcf.cli", "ovcf.train"}
    proc = subprocess.run([sys.executable, "-c", probe.replace("{HEAVY}", repr(heavy))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "[]", "--help imports no command, Hydra or torch"
    listed = {line.split()[0]: line.split(None, 1)[1] for line in lines if line.startswith("  ")}
    assert list(listed) == list(dispatcher.COMMANDS)
    assert listed["train"] == "Fit on one center, test on the other."
    assert all(text and "`python -m" not in text for text in listed.values())


def test_an_unknown_command_is_one_line_naming_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        dispatcher.main(["trian", "model=vgg16"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: unknown command 'trian'") and "train, study, predict" in err[0]


def test_a_command_whose_module_is_missing_says_so(monkeypatch, capsys):
    monkeypatch.setitem(dispatcher.COMMANDS, "ghost", "ovcf.ghost")
    assert "(not in this installation: no module ovcf.ghost)" in dispatcher.usage()
    with pytest.raises(SystemExit) as exit_:
        dispatcher.main(["ghost"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "ovcf.ghost" in err[0], err


def _printed(run, capsys) -> str:
    """What `run()` prints on stdout."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # runpy: ovcf.train may be imported already (the scripts test)
        run()
    return capsys.readouterr().out


def test_a_command_names_its_job_as_python_m_does(monkeypatch, capsys):
    """Hydra names the job, and so its log file, after the task's module: `train` both ways."""
    argv = ["--cfg", "hydra", "--package", "hydra.job"]
    monkeypatch.setattr(sys, "argv", ["ovcf", "train", *argv])
    assert "name: train" in _printed(dispatcher.main, capsys)
    assert sys.argv == ["ovcf", "train", *argv], "the dispatcher gives back sys.argv"
    from ovcf.train import main  # what the ovcf-train script runs

    monkeypatch.setattr(sys, "argv", ["ovcf-train", *argv])
    assert "name: train" in _printed(main, capsys)


def test_a_sweep_through_python_m_ovcf_logs_each_job_once(cli_env, tmp_path):
    """`python -m ovcf synth -m seed=3,4` (as `ovcf synth -m ...`): both jobs run, in the run folders
    `python -m ovcf.synth` uses, and each message is on the console once and in its job's log."""
    args = ["out=${hydra:runtime.output_dir}/cohort", "patients_per_center=1", "n_levels=[5,5]", "plant=null", "report=false"]
    args += ["num_workers=1", "seed=3,4", f"paths.log_dir={tmp_path / 'logs'}"]
    proc = run_cli("ovcf", ["synth", "-m", *args], cli_env, tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    written = [line for line in proc.stdout.splitlines() if line.startswith("Synthetic cohort written to ")]
    assert len(written) == 2, proc.stdout
    (sweep,) = (tmp_path / "logs" / "synth" / "multiruns").iterdir()
    for job in ("0", "1"):
        (log,) = (sweep / job).glob("*.log")
        lines = log.read_text().splitlines()
        assert len(lines) == 1 and lines[0].endswith(f"[INFO] - Synthetic cohort written to {sweep / job / 'cohort'}"), lines
        assert (sweep / job / "cohort" / "clinical.csv").is_file()


@pytest.fixture
def rank(monkeypatch):
    """Sets this process's rank as Lightning does: its `rank_zero_only.rank`, else the launcher's variables."""
    from lightning_utilities.core.rank_zero import rank_zero_only

    def set_rank(lightning: int | None = None, env: int | None = None) -> None:
        if lightning is None:
            monkeypatch.delattr(rank_zero_only, "rank", raising=False)
        else:
            monkeypatch.setattr(rank_zero_only, "rank", lightning, raising=False)
        for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
            monkeypatch.delenv(key, raising=False)
        if env is not None:
            monkeypatch.setenv("LOCAL_RANK", str(env))

    return set_rank


def test_the_console_prints_plain_lines_once_and_on_rank_zero_only(rank, capsys):
    from ovcf.cli import setup_logging
    from ovcf.parallel import track

    setup_logging()
    setup_logging()  # again (bench runs several benchmarks): still one handler
    log = logging.getLogger("ovcf.train")
    rank(lightning=0)
    log.info("Results: run/results.json")
    log.warning("2 patients lack a named fractured level")
    log.error("p1234: missing_slices")
    printed = capsys.readouterr()
    assert printed.out == "Results: run/results.json\nwarning: 2 patients lack a named fractured level\n"
    assert printed.err == "error: p1234: missing_slices\n"

    for lightning, env in ((1, None), (None, 1)):  # a DDP process of rank 1, before and after Lightning knows it
        rank(lightning=lightning, env=env)
        log.info("Results: run/results.json")
        log.warning("careful")
        assert list(track(range(3), 3, "Ingesting")) == [0, 1, 2]  # and no progress bar
        assert capsys.readouterr() == ("", "")
    rank(lightning=None, env=0)
    log.info("back on rank zero")
    assert capsys.readouterr().out == "back on rank zero\n"

    import lightning  # noqa: F401 - its logger prints on its own ("INFO: ...", stderr) and propagates

    logging.getLogger("lightning.pytorch.utilities.seed").info("Seed set to 0")
    assert "Seed set to 0" not in capsys.readouterr().out, "Lightning's messages appear once, not twice"


def test_commands_run_side_by_side_and_one_failure_stops_none(tmp_path, capsys, monkeypatch):
    """`run_commands` (the study's sweeps on a CPU): every run's lines reach the console and the log after
    its name, each run gets its share of the cores as torch threads, and a failed run is named while the
    others finish."""
    from ovcf.cli import CommandError, cpu_cores, run_commands

    (tmp_path / "threads_probe.py").write_text("import os\nprint('threads', os.environ.get('OMP_NUM_THREADS'))\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the runs inherit it: a module that loads nothing heavy
    monkeypatch.setenv("OMP_NUM_THREADS", "99")  # what the runs would inherit without their share
    probe = ["threads_probe"]
    log = tmp_path / "sweep.log"
    run_commands({"a": probe, "b": probe}, log, jobs=2)
    out = capsys.readouterr().out
    text = log.read_text()
    share = max(1, cpu_cores() // 2)
    for name in ("a", "b"):
        assert f"[{name}] threads {share}\n" in out and f"[{name}] threads {share}\n" in text
    assert all(line.startswith(("[a] ", "[b] ")) for line in text.splitlines()), "whole lines, each after its run's name"

    with pytest.raises(CommandError, match=r"ovcf\.nowhere \(bad\) failed .*sweep\.log") as err:
        run_commands({"bad": ["ovcf.nowhere"], "good": probe}, log, jobs=2)
    assert "(good)" not in str(err.value)
    assert f"[good] threads {share}" in log.read_text(), "the good run went on to its end"


def test_runs_started_together_share_one_new_pseudonym_key(tmp_path):
    """Side-by-side runs on a fresh machine all create the key file at once: they must end up with one
    key, or their caches would name the same patient differently."""
    import multiprocessing

    from ovcf.data.pseudonym import load_key

    key_file = tmp_path / "config" / "pseudonym.key"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        keys = pool.map(load_key, [key_file] * 8)
    assert len(set(keys)) == 1 and keys[0] == key_file.read_text().strip().encode()
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in key_file.parent.iterdir()] == ["pseudonym.key"], "no temporary file left"
