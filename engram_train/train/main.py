"""``engram-train``: the Hydra entry point.

    engram-train experiment=debug_cpu trainer.max_steps=50 run.dir=runs/try
    engram-train -m experiment=debug_cpu,moe_baseline_cpu trainer.seed=1,2,3   # a sweep: one run dir per job
    torchrun --nproc-per-node 2 -m engram_train.train.main experiment=debug_cpu parallel.tensor_parallel=2
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from engram_train.config.store import CONF_DIR, compose, register, to_config
from engram_train.errors import UserError, run_main
from engram_train.train import signals

register()


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> None:
    if signals.received() is not None:   # a sweep preempted in an earlier job: start no other
        return
    config = run_main(to_config, cfg)
    from engram_train.train.trainer import run

    multirun = _is_multirun()
    if multirun:
        # Every job of a sweep trains into its own job directory (hydra.sweep.dir/hydra.sweep.subdir),
        # whatever run.dir its experiment names: jobs sharing one would resume each other's checkpoints.
        from hydra.core.hydra_config import HydraConfig

        config.run.dir = HydraConfig.get().runtime.output_dir
    # A user error on any rank, at start or later: `error: <message>` once, exit code 2 on every rank.
    run_main(run, config, on_start=lambda: _write_run_config(config, cfg))
    if multirun:   # the next job of the sweep runs in this process and builds its groups afresh
        from engram_train.parallel import state

        # After a job that returned only: a job that raised ends the sweep, and destroying groups while
        # another rank may still be in a collective on them can hang. Under torchrun the default group
        # is kept for the next job (joining torchrun's rendezvous store a second time hangs); ``main``
        # destroys it once the sweep is over.
        state.destroy_parallel(keep_process_group="RANK" in os.environ)


def _is_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _write_run_config(config, cfg: DictConfig) -> None:
    """``<run.dir>/config.yaml``: the configuration this run trains with, the experiment chosen and the
    command-line overrides (tools/compare_runs.py groups runs by them; docs/benchmarks.md)."""
    if os.environ.get("RANK", "0") != "0":
        return
    from dataclasses import asdict

    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    record = {"experiment": None, "overrides": []}
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        record = {"experiment": hc.runtime.choices.get("experiment"), "overrides": list(hc.overrides.task)}
    os.makedirs(config.run.dir, exist_ok=True)
    path = os.path.join(config.run.dir, "config.yaml")
    with open(path + ".tmp", "w") as f:
        f.write(OmegaConf.to_yaml({**record, **asdict(config)}))
    os.replace(path + ".tmp", path)


def main() -> None:
    signals.install()   # first: a preemption signal during start-up must not kill the rank
    _check_before_hydra(sys.argv[1:])   # before torch is imported: a bad input is reported in a second
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    _main()
    _destroy_process_groups()


def _destroy_process_groups() -> None:
    """After the last job, on success only (torchtitan's rule: destroying groups while another rank may
    still be in a collective can hang): every group, the default one included, before the interpreter
    finalizes them (gloo's threads can abort the process then)."""
    if "torch" not in sys.modules:   # --help, --cfg: nothing was initialized
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from engram_train.parallel import state

        state.destroy_parallel()


def _check_before_hydra(args) -> None:
    """Compose and validate the overrides, check run.dir, data.dir and the data inputs, before Hydra
    runs the job and before torch is imported: Hydra reports its own composition errors over several
    lines ending in a hint, and creates directories under run.dir before the job starts.  A sweep
    (``-m``) is checked job by job, before its first job trains.  Every rank checks the same things;
    rank 0 alone prints.  Hydra's other flags (--help, --cfg, ...) are left to Hydra, and whatever
    this misses is caught around the job (``run_main`` in ``_main``)."""
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    if any(a.startswith("-") for a in overrides):
        return
    for job in (run_main(sweep_jobs, overrides) if multirun else [overrides]):
        config = run_main(compose, job)
        run_main(check_dir, "run.dir", config.run.dir, "checkpoints and metrics go there", node_local=True)
        run_main(check_dir, "data.dir", config.data.dir, "the prepared data and its lock file go there",
                 node_local=True)
        run_main(check_data_inputs, config.data, node_local=True)


def sweep_jobs(overrides):
    """The override lists of a sweep's jobs, expanded the way Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [list(job) for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def check_data_inputs(data_cfg) -> None:
    """What can be checked of the data without reading the corpus: the corpus name, that data.files
    exist, that data.tokenizer is a tokenizer with an EOS token (the prepare step checks the text)."""
    from engram_train.data.prepare import fingerprint
    from engram_train.data.tokenizer import Tokenizer

    fingerprint(data_cfg)
    if data_cfg.tokenizer:
        tokenizer = Tokenizer(data_cfg.tokenizer)
        if data_cfg.corpus == "megatron":   # reads the .idx headers and a sample of tokens: seconds at most
            from engram_train.data.megatron_corpus import check_prefixes

            check_prefixes(data_cfg, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.path)


def check_dir(key: str, value: str, why: str) -> None:
    """``key=value`` must name a directory this process can create, or one it can write."""
    existing = os.path.abspath(value)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UserError(f"{key}={value!r}: {existing} is a file, not a directory; point {key} at a directory "
                        "(it is created if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}={value!r}: {existing} is not writable by this user; choose a {key} you can "
                        f"write ({why})")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
