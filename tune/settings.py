"""A sweep's settings (`Sweep`): everything the driver needs, written to <output_folder>/sweep.json
when the sweep starts and read back by `xfer tune --resume` (and by `xfer report` through
xfer.sweep_files). No Ray, no torch: the CLI imports it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xfer.data.fs import resolve, write_json
from xfer.errors import XferError
from xfer.sweep_files import SETTINGS_FILE, STUDY_DB, read_settings, rung_clock

SCHEDULERS = ("asha", "fifo")  # asha stops the weak trials at its rungs; fifo runs every trial its whole budget
# What ASHA's rungs count (`xfer tune --rungs`; tune.searcher.make_scheduler):
#   adapted       epochs with the adaptation fully on (`adapted_epochs` in each report: the epoch minus
#                 the trial's own searched warm-up), so every trial is judged after the same number of
#                 epochs in which a model could be chosen, never inside its warm-up
#   after_warmup  epochs, but a trial still warming up is neither judged nor recorded; it is judged at
#                 the first rung it reaches warmed (`--asha_after_warmup`)
#   epochs        plain epochs: a trial may be judged, and stopped, inside its warm-up, before it has
#                 any objective value to be judged by
RUNG_CLOCKS = ("adapted", "after_warmup", "epochs")


@dataclass
class Sweep:
    """Everything the driver needs, also after a restart (saved as sweep.json)."""

    name: str
    output: Path
    spec: dict
    base: dict
    space: dict
    n_trials: int
    search_epochs: int
    metric: str
    cpus_per_trial: float
    gpus_per_trial: float
    num_workers: int
    trainer: str
    grace_period: int
    reduction_factor: int
    checkpoint_every: int
    max_failures: int
    seed: int
    data_args: dict                     # xfer.data.inputs.DataSources.to_dict(): what the final scoring reads
    objective: str = "source_val"       # the selection candidate that ranks trials (xfer.selection)
    objective_setting: str = "auto"     # what was asked for (--objective)
    storage_uri: str = ""               # Tune's storage (results, checkpoints): a path or URI; "" = output/ray_results
    reuse_actors: bool = True           # fast path: Tune reuses a trial's actor for the next (tune/trainable.py)
    final_ensemble: int = 1             # at most this many trials in best_model.pt (a sweep.json without it: 1)
    final_model: str = "top"            # tune.final_model.FINAL_RULES (a sweep.json without it: top)
    asha_after_warmup: bool = False     # the rung clock of a sweep.json without `rungs` (xfer.sweep_files.rung_clock)
    scheduler: str = "asha"             # SCHEDULERS: asha stops the weak, fifo runs every trial out
    rungs: str = ""                     # RUNG_CLOCKS: what ASHA's rungs count
    population: int = 1                 # members per Ray trial (tune.trainable.population_trial); 1: one each
    report_every: int = 0               # epochs between a trial's reports (tune.trainable.ReportGate); 0: each second
    tensorboard: bool = False           # TensorBoard logs beside Tune's CSV and JSON results

    def __post_init__(self):
        self.rungs = rung_clock(self.rungs, self.asha_after_warmup)

    @property
    def objective_label(self) -> str:
        return f"peak_val_{self.metric}" if self.objective == "source_val" else self.objective

    @property
    def storage(self) -> str:
        """Where Tune keeps results and checkpoints (a path or a URI, for messages)."""
        return self.storage_uri or str(self.output / "ray_results")

    def storage_location(self):
        """(pyarrow file system, path) of the storage (xfer.data.fs.Location)."""
        return resolve(self.storage)

    @property
    def study_db(self) -> Path:
        return self.output / STUDY_DB

    def save(self) -> None:
        d = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}
        write_json(self.output / SETTINGS_FILE, d, sort_keys=True)

    @classmethod
    def load(cls, output: Path) -> "Sweep":
        p = output / SETTINGS_FILE
        if not p.exists():
            raise XferError(f"--resume: {p} not found (no sweep was started in {output})")
        d = read_settings(p)
        d["output"] = Path(d["output"])
        return cls(**d)
