"""`ovcf <command> [options]` (or `python -m ovcf <command>`): every ovcf command behind one name.

`ovcf train model=densenet121` runs what `python -m ovcf.train model=densenet121` and `ovcf-train
model=densenet121` run, Hydra overrides, `-m` sweeps and `--help` included. Each command's module
is looked up by name when it is chosen, never imported up front: `ovcf --help` reads the modules'
docstrings from their source, so it answers at once instead of loading torch, Lightning and Hydra
for thirteen commands. That also keeps the rule that no module imports an entry point
(tests/test_layout.py).

The chosen module runs as `__main__`, as `python -m` runs it (`runpy`): Hydra then names the job and
its log file as before, and Lightning's DDP launcher, which restarts the command in each process
from `__main__.__spec__`, starts `python -m ovcf.train ...` again.
"""

from __future__ import annotations

import ast
import importlib.util
import runpy
import sys
import tokenize

# command -> the module whose `main()` runs it; pyproject.toml's [project.scripts] has `ovcf-<command>`
# for each (tests/test_commands.py checks the two agree).
COMMANDS = {
    "train": "ovcf.train",
    "study": "ovcf.study",
    "predict": "ovcf.predict",
    "ingest": "ovcf.ingest",
    "synth": "ovcf.synth.__main__",
    "segment": "ovcf.segment",
    "evaluate": "ovcf.evaluate",
    "export": "ovcf.export",
    "pretrain": "ovcf.pretrain",
    "transfer": "ovcf.transfer",
    "sign-ablation": "ovcf.sign_ablation",
    "tune": "ovcf.tune",
    "slurm": "ovcf.slurm",
    "bench": "ovcf.bench.__main__",
}


def summary(module: str) -> str:
    """The first line of `module`'s docstring, less its leading usage example, read from the source
    without importing it; or why the command is not available."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        return f"(not in this installation: no module {module})"
    if not spec.origin.endswith(".py"):
        return ""  # compiled only: no source to read the line from
    doc = ""
    with tokenize.open(spec.origin) as fh:
        for token in tokenize.generate_tokens(fh.readline):
            if token.type == tokenize.STRING:
                doc = ast.literal_eval(token.string)
                break
            if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING):
                break
    first = doc.strip().splitlines()[0] if doc.strip() else ""
    if first.startswith("`") and "`: " in first:  # "`python -m ovcf.train model=...`: fit on one center ..."
        first = first.rsplit("`: ", 1)[1]
    return first[:1].upper() + first[1:]


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {summary(module)}" for name, module in COMMANDS.items()]
    return "\n".join(
        [
            "usage: ovcf <command> [options]   (also: ovcf-<command> [options], python -m ovcf.<module> [options])",
            "",
            "commands:",
            *lines,
            "",
            "Options are the command's Hydra overrides: ovcf train model=densenet121, a sweep with",
            "ovcf train -m model=vgg16,densenet121; `ovcf <command> --help` lists them.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Runs `ovcf <command> [options]`; returns the exit status (0 after `--help`, 2 without a command)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    name, options = argv[0], argv[1:]
    if name not in COMMANDS:
        from ovcf.cli import fail

        fail(f"unknown command '{name}'; choose one of: {', '.join(COMMANDS)} (ovcf --help says what each does)")
    module = COMMANDS[name]
    if importlib.util.find_spec(module) is None:
        from ovcf.cli import fail

        fail(f"ovcf {name} needs the module {module}, which this installation lacks; update ovcf (pip install -e .)")
    # The command sees the argv `python -m <module> [options]` gives it; runpy sets argv[0] to the module's file.
    saved, sys.argv = sys.argv, [sys.argv[0], *options]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
