"""What a new sweep is asked for (`SweepRequest`) and how this invocation runs it (`RunOptions`):
built from the command line's flags by tune/cli.py, or from `tune.sweep`'s keywords. Everything
below takes these, never an argparse object."""

from __future__ import annotations

from dataclasses import dataclass, field

from xfer.data.inputs import DataSources


@dataclass(frozen=True)
class SweepRequest:
    """A new sweep: its data, the base config, the search space and the search's settings
    (README: xfer tune; each field is the flag of the same name)."""

    sources: DataSources
    output_folder: str
    config_path: str | None = None      # best_params.json or a JSON/YAML of config keys
    overrides: dict = field(default_factory=dict)  # config keys every trial gets (e.g. lambda_pseudo)
    fixed: dict = field(default_factory=dict)      # search parameters fixed or narrowed (arch, divergence, --set)
    space: str | dict | None = None     # a built-in space's name, a space file or a space dict; None: centred
    n_trials: int = 24
    search_epochs: int = 20
    scheduler: str = "asha"
    rungs: str = "adapted"
    grace_period: int = 0
    reduction_factor: int = 2
    checkpoint_every: int = 0
    report_every: int = 0
    tensorboard: bool = False
    final_model: str = "greedy"
    final_ensemble: int = 8
    population: int = 1
    max_failures: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    num_workers: int = 1
    trainer: str = "auto"
    storage: str | None = None
    name: str = "sweep"
    reuse_actors: bool = True


@dataclass(frozen=True)
class RunOptions:
    """This invocation's choices, not saved with the sweep: where Ray runs and the display."""

    address: str | None = None          # an existing Ray cluster; None: start a local one
    num_cpus: int | None = None
    num_gpus: int | None = None
    verbose: bool = False               # Ray Tune's own tables instead of the compact display
    progress_every: float = 30.0        # seconds between progress lines when not on a terminal
