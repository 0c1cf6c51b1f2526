"""Sweeps past one machine: what `hydra/launcher=slurm` submits.

`python -m ovcf.slurm [train overrides]` composes the train config as `python -m ovcf.train -m
hydra/launcher=slurm [overrides]` would and prints the sbatch script that submitit writes for each
job, without submitting anything: check partition, GPUs, time and tasks per node before a sweep
waits in a cluster's queue.
"""

from __future__ import annotations

import sys

from omegaconf import OmegaConf

from ovcf.cli import check_overrides, config_dir


def launcher_config(overrides: list[str]) -> dict:
    """`hydra.launcher` of the train config composed with `hydra/launcher=slurm` and `overrides`, resolved."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="train"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # for ${hydra:...} in the folders
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    if "SlurmLauncher" not in str(launcher.get("_target_")):
        raise SystemExit(f"error: hydra/launcher resolves to {launcher.get('_target_')}, not the submitit SLURM launcher")
    return launcher


def sbatch_script(overrides: list[str]) -> str:
    """The sbatch file submitit would write for one job of the sweep (`%j`: the job id SLURM assigns)."""
    import submitit

    class DryRun(submitit.SlurmExecutor):
        """Renders sbatch files where `srun` is missing too (a laptop); never submits."""

        @classmethod
        def affinity(cls) -> int:
            return 1

    params = launcher_config(overrides)
    params.pop("_target_")
    executor = DryRun(folder=params.pop("submitit_folder"), max_num_timeout=params.pop("max_num_timeout"))
    executor.update_parameters(**executor._convert_parameters(params))  # timeout_min -> time, mem_gb -> mem ... as AutoExecutor
    return executor._make_submission_file_text(executor._submitit_command_str, "dryrun")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return
    check_overrides(argv)
    print(sbatch_script([a for a in argv if a != "-m"]))  # the script is the output (stdout), not a message


if __name__ == "__main__":
    main()
