"""`xfer tune`: OptunaSearch proposes, ASHA stops the weak, Ray runs the trials.

    driver                                         every trial (actor or Train workers)
    ------                                         ------------------------------------
    validate the space and config (no trial yet)
    ingest file inputs into the cell store
    embed the training line into the embedding store
    prepare the training data once (node cache)
    Tuner(OptunaSearch(TPE, SQLite) + ASHA)  --->  read stores by path, fit(), report each epoch
    export trials.csv / .parquet, best_params.json,
    mark ASHA-stopped Optuna trials PRUNED (live),
    score the best trial on the test line

Trials are transductive when the test line's peaks are given (--sup_peak_csv):
each trains exactly as `xfer train` does, adapting to the test line's unlabelled
cells (its labels are dropped before any trial reads it). The objective that
ranks trials, drives ASHA and chooses each trial's best epoch is `--objective`
(xfer.selection): `transfer`, label-free, by default when the test line is
given, else `source_val` (the training line's PEAK validation metric). The
shipped defaults are enqueued as the first trial. The test line's labels are
read only after the search, to score the best trial's model.

Everything a resume needs is in <output_folder>/sweep.json; `xfer tune --resume
--output_folder DIR` restores the Tuner and finishes the sweep without
repeating finished trials. On SIGTERM (a scheduler's time limit, scancel, an
eviction) or Ctrl+C the driver saves the sweep's state, shuts Ray down and raises
tune.stop.SweepStopped (`xfer tune` exits with 143 or 130 and prints the resume
line); an unfinished sweep is never exported. Before Tune's loop either signal
stops the driver at once, saying whether --resume can go on (tune.stop.EarlyStop).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import optuna

from xfer.config import TrainConfig
from xfer.report import try_write_report
from xfer.sweep_files import SETTINGS_FILE

from .configure import new_sweep
from .data import DataSpec, load_trial_data
from .export import export
from .ray_start import check_cluster, ray_environment, start_ray
from .request import RunOptions, SweepRequest
from .score import score_best
from .settings import Sweep
from .stop import CleanStop, EarlyStop, EarlyStopped, SweepStopped
from .tuner import make_tuner

log = logging.getLogger(__name__)


def run(request: SweepRequest | None = None, *, resume=None, options: RunOptions | None = None) -> dict:
    """Start a new sweep (`request`) or finish the one in the folder `resume`, wait for it, export
    and score. Returns a summary: the Sweep, the trials table, best_params, metrics, the dashboard
    address, the wall time and report.html's path."""
    if (request is None) == (resume is None):
        raise ValueError("run: give either a new sweep's request or the folder of a sweep to resume")
    options = options or RunOptions()
    ray_environment()
    output = Path(resume if resume is not None else request.output_folder).resolve()
    try:
        # until Tune's loop: SIGTERM and Ctrl+C stop the driver at once (tune.stop.EarlyStop)
        with EarlyStop() as early:
            check_cluster(options, request, resume)  # before any data work: the cluster answers, takes the token, fits a trial
            sw = Sweep.load(output) if resume is not None else new_sweep(request)
            if resume is None:
                # validates and prepares the training data once before any trial (and warms this node's cache)
                load_trial_data(DataSpec(**sw.spec), TrainConfig.from_dict(sw.base))
                sw.save()
            with early.held():  # ray.init is not cut halfway
                ctx = start_ray(options.address, options.num_cpus, options.num_gpus, sw.name, quiet=not options.verbose)
            from .progress import close_all, note_stop  # imports Ray: after ray_environment
    except EarlyStopped as e:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        raise SweepStopped(output, e.signum, started=False,
                           resumable=(output / SETTINGS_FILE).exists()) from None
    dashboard = getattr(ctx, "dashboard_url", None)
    if dashboard:
        log.info("Ray dashboard: http://%s", dashboard)
    t0 = time.perf_counter()
    if not options.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # its INFO lines ("A new study created ...")

    # from here SIGTERM and Ctrl+C stop the sweep with its state saved (tune.stop); after start_ray, whose
    # ray.init sets Ray's own SIGTERM handler
    with CleanStop(quiet=not options.verbose, on_stop=note_stop) as stop:
        tuner = make_tuner(sw, restore=resume is not None, verbose=options.verbose,
                           progress_every=options.progress_every)
        try:
            grid = tuner.fit()
        finally:
            close_all()  # a live display still drawn when fit() raised
        if stop.requested:  # the state is saved, the sweep unfinished: no export, no score
            import ray

            ray.shutdown()  # a local cluster's processes (the trials' included) end here
            raise SweepStopped(sw.output, stop.signum)
    wall = time.perf_counter() - t0
    exported = export(grid, sw)
    metrics = None
    if exported["final"] is not None and (sw.data_args.get("test_csv") or sw.data_args.get("sup_peak_csv")):
        metrics = score_best(sw, exported["final"], exported["best"]["final_model"])
    # report.html: a failure is a warning, never a failed sweep
    return {"sweep": sw, "table": exported["table"], "best": exported["best"], "metrics": metrics,
            "dashboard": dashboard, "wall_seconds": wall, "report": try_write_report(sw.output)}
