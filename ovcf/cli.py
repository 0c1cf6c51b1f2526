"""What every ovcf command (`ovcf X`, `ovcf-X`, `python -m ovcf.X`) shares: the config folder, the Hydra
tail, one-line errors, the console, the device choice and the cohort to read.

Hydra reports an unknown config option (`model=foo`) with a long listing and a traceback hint,
and wraps errors raised inside `instantiate`; users get instead one line that names the problem
and the fix, and exit status 2.

Messages go through `logging` (each module's `log = logging.getLogger(__name__)`); only commands
set it up, never the library. Hydra does so per job with `conf/hydra/job_logging/ovcf.yaml`: the
console shows plain lines as `print` would (`warning: ` and `error: ` prefixes), the run folder's
`<job>.log` keeps them with time and level, and both drop records of DDP processes other than rank
zero, which run the same code. Importing this module stays cheap (Hydra, OmegaConf and the
generator load when used), so the `ovcf` dispatcher can report its errors through `fail`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from ovcf.errors import OvcfError
from ovcf.parallel import process_rank

if TYPE_CHECKING:
    from omegaconf import DictConfig

log = logging.getLogger(__name__)


def config_dir() -> str:
    """`ovcf/conf` inside an installed wheel, else the checkout's top-level `conf/`."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf")


def fail(message: str) -> None:
    """Exits with status 2 and `error: message` on stderr; printed, not logged: it also ends commands
    before their logging is set up (a bad override, an unknown subcommand)."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


class RankZeroFilter(logging.Filter):
    """Passes the records of the process of rank zero only: every DDP process runs the same command,
    and one copy of each message is enough. The rank is read per record (Lightning sets it when the
    strategy starts)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return process_rank() == 0


class ConsoleFormatter(logging.Formatter):
    """A message as a plain line, as `print` wrote it: `warning: ` before warnings, `error: ` before
    errors (as `fail` writes them), no time or level (the job's log file has those)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


class ConsoleHandler(logging.StreamHandler):
    """The console of a command: stdout, errors on stderr, rank zero only.

    The stream is looked up per record, not kept from setup, so output redirected later (pytest's
    capture, `contextlib.redirect_stdout`) still receives it."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(ConsoleFormatter())
        self.addFilter(RankZeroFilter())

    def emit(self, record: logging.LogRecord) -> None:
        if _on_screen_already(record.name):
            return
        self.stream = sys.stderr if record.levelno >= logging.ERROR else sys.stdout
        super().emit(record)


def _on_screen_already(name: str) -> bool:
    """Whether a logger on the way from `name` to the root prints to the terminal itself: `import
    lightning` gives its logger a console handler of its own ("INFO: Seed set to 0") and lets the record
    go on to the root, where the command's console would print it a second time."""
    logger = logging.getLogger(name)
    while logger.parent is not None:  # the root has no parent
        if any(type(h) is logging.StreamHandler for h in logger.handlers):
            return True
        if not logger.propagate:
            return False
        logger = logger.parent
    return False


def setup_logging(level: int = logging.INFO) -> None:
    """The console of `ConsoleHandler` on the root logger, for commands that Hydra does not start
    (benchmarks) and for code that calls a command's function directly (tests, notebooks); Hydra's
    commands get it, and the log file, from `conf/hydra/job_logging/ovcf.yaml`. Calling it again
    replaces the handler, so messages never print twice."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ConsoleHandler)]:
        root.removeHandler(handler)
    root.addHandler(ConsoleHandler())
    root.setLevel(level)


def check_overrides(argv: list[str]) -> None:
    """Exits with one line if a `group=option` override names an option that does not exist."""
    root = Path(config_dir())
    for arg in argv:
        if "=" not in arg or arg.startswith("-"):
            continue
        group, value = arg.split("=", 1)
        group = group.lstrip("+~")
        if "@" in group or "." in group or group.startswith("hydra") or not (root / group).is_dir():
            continue
        if any(token in value for token in ("(", "[", "*", "$")) or value in ("", "null"):
            continue  # sweep syntax or interpolation: let Hydra handle it
        options = sorted(p.stem for p in (root / group).glob("*.yaml"))
        for option in value.split(","):
            if option.strip() not in options:
                fail(f"unknown {group} '{option.strip()}' in {arg}; choose one of: {', '.join(options)}")


def guarded(fn: Callable, *args, **kwargs):
    """Runs `fn`, turning an `OvcfError` (also when wrapped by Hydra's instantiate) into one line."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a user error
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, OvcfError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        fail(str(cause))


def hydra_main(config_name: str, fn: Callable[[DictConfig], object]) -> Callable[[], object]:
    """The `main()` of an entry point: checks `group=option` overrides, composes `conf/<config_name>.yaml`
    with the command line, and runs `fn(cfg)` with one-line errors; the task returns what `fn` returns
    (the optimized metric, for Hydra's sweepers), `main()` returns None (a console script exits 0)."""
    import hydra

    def task(cfg: DictConfig):
        return guarded(fn, cfg)

    task.__wrapped__ = fn  # Hydra names the job (and its log file) after the module that defines `fn`
    wrapped = hydra.main(version_base="1.3", config_path=config_dir(), config_name=config_name)(task)

    def main():
        check_overrides(sys.argv[1:])
        return wrapped()

    return main


def job_overrides() -> list[str]:
    """The command-line overrides of this job (what tells sweep runs apart), or none outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    try:
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return []


def debug_choice() -> str | None:
    """The `debug=` option this command was started with (a config group, so not a plain key): commands
    that run others pass it on."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.choices.get("debug")


def device(choice: str) -> str:
    """`auto`: CUDA when a GPU is visible, else the CPU; anything else as given (cpu, cuda, cuda:1)."""
    if choice != "auto":
        return choice
    import torch  # only when a command needs a device: the CLI helpers load without it

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_cohort(cfg: DictConfig) -> None:
    """Points `cfg.data.cohort` at a cohort folder: the user's, or the built-in synthetic cohort of
    `cfg.data.synthetic`, generated into `paths.data_dir` on first use and reused after.

    The entry point decides this, not the data module, so reading data never starts the
    generator. With a user's cohort, `data.synthetic` becomes null: the run records no generator.
    """
    from omegaconf import OmegaConf, open_dict

    from ovcf.synth.cohort import synthetic_cohort  # the generator's imports only for a command that reads data

    data = cfg.data
    with open_dict(data):
        if data.cohort is not None:
            data.synthetic = None
            return
        params = OmegaConf.to_container(data.synthetic, resolve=True)
        data.cohort = str(synthetic_cohort(Path(cfg.paths.data_dir), params, data.ingest_workers, data.progress))


def check_data(cfg: DictConfig) -> None:
    """Checks a user's cohort folder, its CSV and the center names before a command loads torch and
    Lightning (half a minute on a small CPU): a wrong path or name fails in a second. The data module
    checks the same again, through the same function."""
    data = cfg.get("data")
    if data is not None and data.get("cohort") is not None:
        from ovcf.data.ingest import check_centers

        check_centers(Path(data.cohort), data.get("dev_center"), data.get("external_center"))


class CommandError(OvcfError):
    """A command that another one runs failed: what was done stays, the same command resumes."""


def run_command(argv: list[str], log_file: Path) -> None:
    """Runs `python -m <argv>`, echoing its output to the console and to `log_file`.

    Commands that chain others (the study, leave-one-style-out) run each as its own process, as a
    user would type it, so no entry point imports another."""
    run_commands({"": argv}, log_file, jobs=1)


def cpu_cores() -> int:
    """The CPU cores this process may run on (a container's or `taskset`'s share, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def side_by_side(jobs: int | None, runs: int, launcher: str | None = None) -> int:
    """How many of `runs` training runs go at once: `jobs`, or (None) all of them on a CPU and one by one
    on a GPU; one by one under a launcher (such as slurm), which schedules its own."""
    if launcher or runs < 2:
        return 1
    if jobs is not None:
        return max(1, min(int(jobs), runs))
    return 1 if device("auto") != "cpu" else runs


def run_commands(runs: dict[str, list[str]], log_file: Path, jobs: int) -> None:
    """Runs `python -m <argv>` for each named run, `jobs` at a time, each line of output echoed to the
    console and to `log_file` after its run's name (`[unet] ...`).

    On a CPU, small networks use a second core poorly (a DenseNet-121 step: 1.2x faster on 2 threads;
    two processes of 1 thread: 2x), so a sweep's runs go faster side by side, each with an equal share of
    the cores as torch threads (`OMP_NUM_THREADS`; one at a time: inherited). A run that fails does not
    stop the others: what they computed is kept, and the error names every failed run."""
    env = dict(os.environ)
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, cpu_cores() // jobs))
        log.info(
            f"{len(runs)} runs side by side, {jobs} at a time, {env['OMP_NUM_THREADS']} torch thread(s) each (jobs=1: one by one)"
        )
    lock = threading.Lock()
    failed: list[str] = []

    def one(name: str, argv: list[str], fh) -> None:
        prefix = f"[{name}] " if name else ""
        with lock:
            log.info(f"{prefix}$ python -m " + " ".join(argv))
        proc = subprocess.Popen(
            [sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        for line in proc.stdout:
            with lock:
                sys.stdout.write(prefix + line)
                fh.write(prefix + line)
        if proc.wait() != 0:
            with lock:
                failed.append(f"{argv[0]}{f' ({name})' if name else ''} failed (exit {proc.returncode})")

    with open(log_file, "a") as fh, ThreadPoolExecutor(max(1, jobs)) as pool:
        list(pool.map(lambda item: one(*item, fh), runs.items()))
    if failed:
        raise CommandError(f"{'; '.join(failed)}; the output is in {log_file}. Fix it and re-run the same command")
