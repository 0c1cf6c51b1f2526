"""Crash-safe outputs: reports and indexes are replaced whole, and ingest workers die with their parent."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ovcf.data.ingest import _write_index
from ovcf.eval.predictions import write_predictions

ROOT = Path(__file__).resolve().parents[1]

# Modules that write results, splits, indexes, leaderboards, metrics, summaries and reports.
OUTPUT_MODULES = (
    "ovcf/training.py",
    "ovcf/tune.py",
    "ovcf/data/ingest.py",
    "ovcf/data/splits.py",
    "ovcf/eval/leaderboard.py",
    "ovcf/eval/predictions.py",
    "ovcf/eval/report.py",
    "ovcf/inference/validation.py",
    "ovcf/inference/patient.py",
    "ovcf/segment.py",
    "ovcf/sign_ablation.py",
    "ovcf/transfer.py",
    "ovcf/study.py",
)
WRITERS = {"write_text", "write_bytes", "save_as", "to_csv"}  # methods that write a file in place


def direct_writes(source: str) -> list[int]:
    """Lines of `source` that write a file in place: `open` in a text write mode, `json.dump`, `.write_text` and the like.

    Binary writers handed to `ovcf.atomic.write_atomic` as callbacks (`open(tmp, "wb")`) are not counted.
    """
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "open":
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            text = mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else "r"
            if ("w" in text or "x" in text) and "b" not in text:
                lines.append(node.lineno)
        elif isinstance(func, ast.Attribute) and (
            func.attr in WRITERS or (func.attr == "dump" and isinstance(func.value, ast.Name) and func.value.id == "json")
        ):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_static_check_finds_direct_writes():
    bad = """
    open(p, "w").write("x")
    open(p, mode="wt")
    p.write_text("x")
    json.dump({}, fh)
    ds.save_as(p)
    """
    good = """
    open(p)
    open(p, "rb")
    open(tmp, "wb")
    open(log, "a")
    write_atomic(p, ds.save_as)
    write_text(p, "x")
    """
    assert direct_writes(textwrap.dedent(bad)) == [2, 3, 4, 5, 6]
    assert direct_writes(textwrap.dedent(good)) == []


@pytest.mark.parametrize("module", OUTPUT_MODULES)
def test_output_modules_write_only_through_atomic(module):
    found = direct_writes((ROOT / module).read_text())
    assert found == [], f"{module}: direct writes on lines {found}; use ovcf.atomic (write_text, write_json, write_csv)"


class Unprintable:
    """A value that fails when the CSV writer turns it into text: a writer that raises half-way."""

    def __str__(self) -> str:
        raise RuntimeError("interrupted")


def _index_row(row: int, age) -> dict:
    return {"row": row, "pseudonym": f"p{row}", "age": age, "dxa_t_score": None, "reasons": [], "flags": []}


@pytest.mark.parametrize(
    "write",
    [
        lambda path, rows: _write_index(path, rows),
        lambda path, rows: write_predictions(path, rows, ["row", "pseudonym"]),
    ],
    ids=["index.csv", "predictions.csv"],
)
def test_an_interrupted_write_leaves_the_previous_file(tmp_path, write):
    path = tmp_path / "out.csv"
    write(path, [_index_row(1, 70.0), _index_row(2, 71.0)])
    before = path.read_bytes()
    rows = [_index_row(i, 60.0) for i in range(1, 200)] + [_index_row(200, Unprintable())]
    with pytest.raises(RuntimeError, match="interrupted"):
        write(path, rows)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"], "no temporary file is left behind"


def test_write_helpers_replace_files_whole(tmp_path):
    from ovcf.atomic import write_csv, write_json, write_text

    write_text(tmp_path / "a.md", "# ä\n")
    write_json(tmp_path / "a.json", {"x": [1]}, indent=2)
    write_csv(tmp_path / "a.csv", [{"x": 1, "y": "a"}, {"x": 2}], ["x", "y"], restval="")
    assert (tmp_path / "a.md").read_text(encoding="utf-8") == "# ä\n"
    assert (tmp_path / "a.json").read_text() == '{\n  "x": [\n    1\n  ]\n}'
    assert (tmp_path / "a.csv").read_text().splitlines() == ["x,y", "1,a", "2,"]
    with pytest.raises(RuntimeError):
        write_csv(tmp_path / "a.csv", [{"x": Unprintable()}], ["x"])
    assert (tmp_path / "a.csv").read_text().splitlines() == ["x,y", "1,a", "2,"]


POOL_SCRIPT = """
import os, sys, time
from pathlib import Path

from ovcf.parallel import worker_pool

def nap(folder):
    (Path(folder) / str(os.getpid())).touch()  # the worker is running its task
    time.sleep(120)

if __name__ == "__main__":
    with worker_pool(2) as pool:
        for _ in range(2):
            pool.submit(nap, sys.argv[1])
        time.sleep(120)
"""


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_pool_workers_end_when_their_parent_is_killed(tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(POOL_SCRIPT)
    started = tmp_path / "started"
    started.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, str(script), str(started)], env=env, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while len(list(started.iterdir())) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, "the pool did not start two workers"
            time.sleep(0.2)
        workers = [int(p.name) for p in started.iterdir()]
        assert all(_alive(pid) for pid in workers)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        lingering = [pid for pid in workers if _alive(pid)]
    finally:
        proc.kill()
        for pid in [int(p.name) for p in started.iterdir()]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)  # only the workers this test started
    assert lingering == [], "pool workers outlived their killed parent"
