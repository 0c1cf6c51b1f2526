"""The package's shape: no import loop between its folders, and no module imports an entry point.

Read from the source (every `import` anywhere in a module, also inside functions), so a loop hidden
in a function body counts as one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import ovcf

PACKAGE = Path(ovcf.__file__).parent
ENTRY_POINTS = {
    "ovcf.train", "ovcf.ingest", "ovcf.segment", "ovcf.evaluate", "ovcf.study", "ovcf.predict", "ovcf.export",
    "ovcf.sign_ablation", "ovcf.transfer", "ovcf.pretrain", "ovcf.slurm", "ovcf.tune", "ovcf.synth.__main__",
    "ovcf.bench.__main__", "ovcf.__main__",
}  # fmt: skip
# ovcf.__main__ is the `ovcf <command>` dispatcher: an entry point that starts the others, so the rule
# binds it too. It names them as strings (runpy, by name, when chosen), which this check does not
# count as imports: that is the point, `ovcf --help` loads none of them.
# What each folder may import besides itself and the shared root modules (contract, errors, parallel).
ALLOWED = {
    "synth": set(),
    "data": set(),
    "models": set(),
    "eval": set(),
    "tasks": {"data", "models", "eval"},
    "inference": {"data", "models", "tasks", "eval"},
    "cli": {"synth", "data"},  # a command resolves its cohort (the generator) and checks it before torch loads
    # one run of ovcf.train or ovcf.tune; inference: a segmenter's real-CT check goes through ovcf.segment's path
    "training": {"cli", "data", "models", "tasks", "eval", "inference"},
    "ablation": {"synth", "inference", "eval"},  # scores trained classifiers on cohorts rendered again
    "bench": {"cli", "data", "models", "tasks", "synth"},
}
SHARED = {"atomic", "contract", "errors", "parallel"}  # every folder may use them (atomic: outputs written whole)


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ovcf"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ovcf")}
    return found


def _unit(module: str) -> str:
    """The folder (data, eval ...) or root module (cli, contract ...) a module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ovcf"


def test_no_module_imports_an_entry_point():
    """Entry points are what a user types; the code they share lives in the package (an entry point
    imported as a library drags its command line along)."""
    modules = _modules()
    offenders = {name: sorted((_imports(path) & ENTRY_POINTS) - {name}) for name, path in modules.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_folders_import_only_downwards():
    """data, models, eval and synth import no other folder; tasks and inference only those below them."""
    modules = _modules()
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name in ENTRY_POINTS:
            continue
        unit = _unit(name)
        targets = {_unit(m) for m in _imports(path) if m in modules} - {unit, "ovcf"} - SHARED
        edges.setdefault(unit, set()).update(targets)
    wrong = {unit: sorted(targets - ALLOWED.get(unit, set())) for unit, targets in edges.items() if unit not in SHARED}
    assert {u: t for u, t in wrong.items() if t} == {}

    # and so no loop: a walk along the edges never comes back
    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges.get(start, ()))

    assert [u for u in edges if reaches(u, u, set())] == []


def test_only_the_cli_sets_up_logging():
    """The library logs (`logging.getLogger(__name__)`) and never adds handlers or configures logging:
    commands do, through ovcf.cli (Hydra's job_logging, or `setup_logging`), so a message prints once."""
    setup = ("basicConfig", "dictConfig", "fileConfig", "addHandler")
    calls = {
        name: sorted({node.func.attr for node in ast.walk(ast.parse(path.read_text())) if _calls(node, setup)})
        for name, path in _modules().items()
        if name != "ovcf.cli"
    }
    assert {name: found for name, found in calls.items() if found} == {}


def _calls(node: ast.AST, names: tuple[str, ...]) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in names
