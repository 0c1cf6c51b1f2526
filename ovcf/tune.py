"""`python -m ovcf.tune hparams_search=classification_optuna model=densenet121`: an Optuna search on the validation metric.

The search space and the study's settings are the `tune:` block of `conf/hparams_search/<name>.yaml`;
every other argument is a train override (`model=`, `trainer=gpu`, `tune.n_trials=40` ...). Each trial
is one training run: its config is composed as `python -m ovcf.train <arguments> <trial's values>`
would compose it, and `ovcf.training.train` fits it in this process with Optuna's Lightning pruning
callback watching the optimized metric at every validation epoch, into
`<paths.log_dir>/tune/<study>/trial_<number>/` (results.json as a train run writes it).

The study is stored (SQLite by default; a journal file or an RDB server for several processes, e.g.
SLURM jobs, working on one study), so a search continues where it stopped:

- `tune.n_trials` is the number of finished (complete or pruned) trials the study should hold: a re-run
  runs only those still missing, and parallel processes stop once the study holds them all;
- with an RDB storage a running trial writes a heartbeat; one whose process died (killed, preempted)
  is failed by the next process that starts a trial, and run again with the same values
  (`tune.max_retry` times).

After each trial the study folder gets `leaderboard.csv` and `leaderboard.md` (every trial: state,
value, values searched); at the end the best trial is printed. Trials are chosen on validation only:
the external test is reported, never used to choose.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path

import optuna
from omegaconf import DictConfig, OmegaConf, open_dict
from optuna.trial import TrialState

from ovcf.cli import check_overrides, config_dir, guarded, setup_logging
from ovcf.errors import ConfigError, OvcfError
from ovcf.eval.leaderboard import write_tables

log = logging.getLogger(__name__)

KINDS = {"float": ("low", "high"), "int": ("low", "high"), "categorical": ("choices",)}  # required fields
OPTIONAL = {"float": ("log", "step"), "int": ("log", "step"), "categorical": ()}
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)  # the trials tune.n_trials counts (not failed or running ones)
_ABSENT = object()


class TrialCrashed(Exception):
    """A trial's training raised: the trial is failed and the search goes on (a user error stops it)."""


def compose_run(overrides: list[str]) -> DictConfig:
    """The train config `python -m ovcf.train <overrides>` would run, composed without starting Hydra.

    Hydra's own node is set as the current HydraConfig (so a run records its overrides and `debug=`
    choice as under `ovcf.train`) and removed from the returned config, as Hydra does for a job.
    Call inside `initialize_config_dir`."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException

    try:
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    except HydraException as exc:  # an override Hydra cannot apply (a typo in a key, bad syntax)
        raise ConfigError(" ".join(str(exc).split())) from exc
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def override_keys(overrides: list[str]) -> set[str]:
    """The keys that `key=value` overrides set (`+`/`~` prefixes dropped)."""
    return {a.split("=", 1)[0].lstrip("+~") for a in overrides if "=" in a}


def search_space(cfg: DictConfig, fixed: set[str]) -> dict[str, dict]:
    """`tune.params` checked (keys of the train config, known types, their fields), without the keys the
    command line fixes: passing `data.roi_margin=null` leaves that parameter out of the search."""
    params = cfg.tune.get("params") or {}
    space = {}
    for key, spec in params.items():
        if OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=False) is _ABSENT:
            raise ConfigError(f"tune.params: '{key}' is not a key of the train config; search an existing key (e.g. model.lr)")
        spec = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else spec
        kind = spec.get("type") if isinstance(spec, dict) else None
        if kind not in KINDS:
            raise ConfigError(
                f"tune.params.{key}: type {kind!r}; use float, int or categorical ({{type: float, low: 0, high: 1}})"
            )
        missing = [f for f in KINDS[kind] if spec.get(f) is None]
        unknown = sorted(set(spec) - {"type", *KINDS[kind], *OPTIONAL[kind]})
        if missing or unknown:
            fields = ", ".join([*KINDS[kind], *OPTIONAL[kind]])
            wrong = f"missing {', '.join(missing)}" if missing else f"not {', '.join(unknown)}"
            raise ConfigError(f"tune.params.{key}: a {kind} takes {fields} ({wrong})")
        if key not in fixed:
            space[key] = spec
    if not space:
        raise ConfigError("tune.params: nothing left to search (every parameter is fixed on the command line)")
    return space


def suggest(trial, space: dict[str, dict]) -> dict:
    """The trial's value of each parameter, drawn by the study's sampler."""
    values = {}
    for key, spec in space.items():
        log, step = bool(spec.get("log")), spec.get("step")
        if spec["type"] == "categorical":
            values[key] = trial.suggest_categorical(key, list(spec["choices"]))
        elif spec["type"] == "int":
            values[key] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), step=int(step or 1), log=log)
        else:
            values[key] = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), step=step and float(step), log=log)
    return values


def as_override(key: str, value) -> str:
    """`key=value` in Hydra's override grammar (null, true/false, numbers, plain or quoted strings)."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, (int, float)):
        text = repr(value)
    else:
        text = value if re.fullmatch(r"[\w./:-]+", str(value)) else json.dumps(str(value))
    return f"{key}={text}"


def _writable(folder: Path, what: str) -> None:
    """Creates `folder` and proves a file can be written there, or says which setting to change."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        why = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror or exc
        raise ConfigError(f"{what}: cannot write in {folder} ({why}); pass a writable one") from exc


def open_storage(
    spec: str,
    folder: Path,
    study_name: str,
    heartbeat_interval: int | None = 60,
    grace_period: int | None = None,
    max_retry: int | None = 2,
):
    """The study's storage, its folder created.

    Args:
        spec: `sqlite` (`<folder>/<study_name>.db`), `journal` (`<folder>/<study_name>.log`: an append-only
            file that processes on a shared file system can share, as SLURM jobs do), a journal file ending
            in `.log`, or an RDB URL (`sqlite:///path.db`, `postgresql://...`).
        folder: where `sqlite` and `journal` keep their file.
        study_name: names that file.
        heartbeat_interval: seconds between a running trial's heartbeats (RDB only: the journal has none);
            None: no heartbeat, so a trial whose process died stays RUNNING.
        grace_period: seconds without a heartbeat after which a RUNNING trial counts as dead (None: twice
            the interval).
        max_retry: times a dead trial is queued again with its values (None: always).
    """
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    spec = str(spec)
    if spec in ("sqlite", "journal"):
        path = Path(folder) / f"{study_name}.{'db' if spec == 'sqlite' else 'log'}"
        url = f"sqlite:///{path}" if spec == "sqlite" else None
    elif "://" in spec:
        url = spec
        path = Path(spec.removeprefix("sqlite:///")) if spec.startswith("sqlite:///") else None
    elif spec.endswith(".log"):
        url, path = None, Path(spec).expanduser()
    else:
        raise ConfigError(
            f"tune.storage={spec}: use sqlite, journal, a journal file ending in .log or an RDB URL (sqlite:///..., postgresql://...)"
        )
    if path is not None:
        _writable(path.parent, f"tune.storage={spec}")
    if url is None:
        return JournalStorage(JournalFileBackend(str(path)))
    heartbeat = {
        "heartbeat_interval": heartbeat_interval,
        "grace_period": grace_period,
        "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry=max_retry) if heartbeat_interval else None,
    }
    try:
        return RDBStorage(url, **heartbeat)
    except (RuntimeError, ImportError, optuna.exceptions.StorageInternalError) as exc:  # an old schema, a missing driver
        raise ConfigError(f"tune.storage={spec}: {' '.join(str(exc).split())}") from exc
    except Exception as exc:
        if type(exc).__module__.startswith("sqlalchemy"):  # cannot open or write the database
            raise ConfigError(f"tune.storage={spec}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
        raise


def fail_dead_trials(study, heartbeat: bool) -> None:
    """Fails the RUNNING trials whose process stopped sending heartbeats, and says so.

    Optuna does the same before each trial it starts (the retry callback then queues the trial again
    with its values); doing it here first lets the user see which trials died."""
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return
    optuna.storages.fail_stale_trials(study)
    dead = sorted(t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in running)
    if dead:
        log.info(f"Trials {dead}: their process died (no heartbeat for tune.grace_period s); failed, to be run again")
    alive = sorted(running - set(dead))
    if alive:
        why = "or died less than tune.grace_period s ago" if heartbeat else "or died: this storage keeps no heartbeat"
        log.info(f"Trials {alive} are RUNNING, in another process {why}; running trials do not count towards tune.n_trials")


def finished(study) -> int:
    """Trials that count towards `tune.n_trials`: complete or pruned, by any process."""
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def _cell(value, column: str = "") -> str:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)


def leaderboard_rows(study, metric: str) -> list[dict]:
    """One row per trial, best value first: its state, value, values searched, the external test metric
    of its run (reported, never used to choose), the trial it retries and its run folder."""
    key = metric.removeprefix("val/")
    maximize = study.direction.name == "MAXIMIZE"
    table = []
    for t in study.get_trials(deepcopy=False):
        folder = t.user_attrs.get("folder")
        results = Path(folder) / "results.json" if folder else None
        test = (json.loads(results.read_text()).get("test") or {}) if results and results.is_file() else {}
        row = {"trial": t.number, "state": t.state.name, metric: t.value if t.value is not None else float("nan")}
        row |= {name: value for name, value in t.params.items()}
        row[f"test_{key}"] = float(test.get(key, float("nan")))
        row["retry_of"] = t.system_attrs.get("failed_trial", "")
        row["minutes"] = round(t.duration.total_seconds() / 60, 1) if t.duration else float("nan")
        row["run"] = Path(folder).name if folder else ""  # its folder beside the leaderboard
        table.append(row)
    done = [r for r in table if r["state"] == "COMPLETE"]
    done.sort(key=lambda r: -r[metric] if maximize else r[metric])
    rest = sorted((r for r in table if r["state"] != "COMPLETE"), key=lambda r: r["trial"])
    for i, row in enumerate([*done, *rest]):
        row["best"] = "*" if i == 0 and done else ""
    return [*done, *rest]


def write_leaderboard(study, folder: Path, metric: str) -> Path:
    """`leaderboard.csv` and `leaderboard.md` of every trial in `folder`; returns the Markdown path."""
    heading = [
        f"# Study {study.study_name}",
        "",
        f"Trials ranked by {metric} (validation, development center; {study.direction.name.lower()}); "
        "test = external center, never used to choose.",
    ]
    return write_tables(folder, leaderboard_rows(study, metric), heading, _cell)


def _refuse_runner_options(overrides: list[str]) -> None:
    """Hydra's run options do nothing here (no Hydra run starts): say what replaces them."""
    for arg in overrides:
        if arg.lstrip("+~").startswith(("hydra.", "hydra/")):
            raise ConfigError(
                f"{arg}: ovcf.tune runs its trials in its own process, not through Hydra's launcher or sweeper; the "
                "search's settings are tune.* (tune.n_trials, tune.study_name, tune.storage), and on SLURM several "
                "ovcf.tune jobs share one study (docs/scaling-out.md#slurm)"
            )


def _one_device(cfg: DictConfig) -> None:
    """Refuses DDP: Lightning would start this command again in every process, each running its own trials."""
    trainer = cfg.trainer
    devices = trainer.get("devices")
    one = devices in (1, "1") or (OmegaConf.is_list(devices) and len(devices) == 1)
    if not one or "ddp" in str(trainer.get("strategy", "")) or int(trainer.get("num_nodes") or 1) > 1:
        raise ConfigError(
            f"ovcf.tune trains each trial on one device (trainer.devices={devices}, strategy={trainer.get('strategy')}): "
            "drop trainer=ddp, and run several ovcf.tune processes on one study instead (docs/scaling-out.md#slurm)"
        )


def tune(overrides: list[str]) -> float | None:
    """Runs the search of `hparams_search=<name>` with these train overrides; returns the study's best value."""
    from hydra import initialize_config_dir
    from hydra.utils import instantiate

    _refuse_runner_options(overrides)
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="train"):
        cfg = compose_run(overrides)
        if cfg.get("tune") is None:
            names = ", ".join(sorted(p.stem for p in (Path(config_dir()) / "hparams_search").glob("*.yaml")))
            raise ConfigError(f"pass hparams_search=<name> (the search space and study settings; one of: {names})")
        _one_device(cfg)
        settings = OmegaConf.to_container(cfg.tune, resolve=True)
        metric = cfg.optimized_metric
        space = search_space(cfg, override_keys(overrides))
        log_dir = Path(cfg.paths.log_dir)
        name = settings["study_name"]
        folder = log_dir / "tune" / name
        _writable(folder, "paths.log_dir")
        storage = open_storage(
            settings.get("storage", "sqlite"),
            log_dir / "optuna",
            name,
            settings.get("heartbeat_interval"),
            settings.get("grace_period"),
            settings.get("max_retry"),
        )
        try:
            sampler = instantiate(cfg.tune.sampler) if cfg.tune.get("sampler") else None
            pruner = instantiate(cfg.tune.pruner) if cfg.tune.get("pruner") else optuna.pruners.NopPruner()
        except Exception as exc:  # noqa: BLE001 - a wrong _target_ or argument, named in one line
            raise ConfigError(f"tune.sampler / tune.pruner: {' '.join(str(exc).split())[:300]}") from exc
        study = optuna.create_study(
            study_name=name, storage=storage, sampler=sampler, pruner=pruner, direction=settings["direction"], load_if_exists=True
        )
        folds = int(cfg.get("cv", {}).get("folds") or 1)
        target, done = int(settings["n_trials"]), finished(study)
        missing = target - done
        log.info(f"Study {name}: {done} of tune.n_trials={target} trials finished; searching {', '.join(space)}")
        for key in sorted(set(cfg.tune.params) - set(space)):
            log.info(f"  {key}: fixed on the command line, not searched")
        fail_dead_trials(study, isinstance(storage, optuna.storages.RDBStorage) and bool(storage.get_heartbeat_interval()))
        from ovcf.training import train  # torch and the data stack: once the settings hold

        def objective(trial) -> float:
            values = suggest(trial, space)
            run = folder / f"trial_{trial.number}"
            trial.set_user_attr("folder", str(run))
            trial_cfg = compose_run([*overrides, *(as_override(k, v) for k, v in values.items()), f"paths.output_dir={run}"])
            run.mkdir(parents=True, exist_ok=True)
            log.info(f"Trial {trial.number}: {' '.join(as_override(k, v) for k, v in values.items())} -> {run}")
            callbacks = [pruning_callback(trial, metric)] if folds == 1 else []
            try:
                return train(trial_cfg, callbacks)
            except (optuna.TrialPruned, OvcfError):
                raise  # pruned; or a user error, which every trial would hit: the search stops on it
            except Exception as exc:
                raise TrialCrashed(f"trial {trial.number} failed: {type(exc).__name__}: {exc} (its run: {run})") from exc
            finally:
                _free_memory()

        def record(study, trial) -> None:
            write_leaderboard(study, folder, metric)

        if missing > 0:
            study.optimize(
                objective,
                n_trials=missing,  # at most what is missing; a failed trial uses up one (a re-run tries again)
                catch=(TrialCrashed,),
                callbacks=[optuna.study.MaxTrialsCallback(target, states=FINISHED), record],
                gc_after_trial=True,
            )
        else:
            log.info(f"The study holds its {target} trials: raise tune.n_trials to search further")
        board = write_leaderboard(study, folder, metric)
    return report(study, metric, board)


def pruning_callback(trial, metric: str):
    """Optuna's Lightning pruning callback, reporting `metric` at each validation epoch of the fit only.

    The run validates and tests the best checkpoint after the fit with the same trainer; that
    validation is no epoch, and pruning the trial there would throw away a finished run."""
    from lightning.pytorch.trainer.states import TrainerFn
    from optuna_integration import PyTorchLightningPruningCallback

    class FitPruning(PyTorchLightningPruningCallback):
        def on_validation_end(self, trainer, pl_module) -> None:
            if trainer.state.fn == TrainerFn.FITTING:
                super().on_validation_end(trainer, pl_module)

    return FitPruning(trial, monitor=metric)


def _free_memory() -> None:
    """A trial's model and data go before the next one starts (GPU memory included)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def report(study, metric: str, board: Path) -> float | None:
    """Prints the trial counts by state and the best trial; returns its value (None: no trial completed)."""
    from collections import Counter

    states = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    counts = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
    log.info(f"Trials: {counts}. Leaderboard: {board} (and leaderboard.csv)")
    try:
        best = study.best_trial
    except ValueError:
        log.info("No trial has completed (pruned and failed ones have no final value): raise tune.n_trials to run more")
        return None
    values = " ".join(as_override(k, v) for k, v in best.params.items())
    log.info(f"Best trial {best.number}: {metric} {best.value:.4f} with {values} ({best.user_attrs.get('folder', '')})")
    return best.value


def main(argv: list[str] | None = None) -> float | None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return None
    args = [a for a in argv if a not in ("-m", "--multirun")]  # `ovcf.train -m` habit: a search is one process
    check_overrides(args)
    setup_logging()  # no Hydra job here: the console that Hydra's commands get from job_logging
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeats: "experimental" since 2.8
    return guarded(tune, args)


if __name__ == "__main__":
    main()
