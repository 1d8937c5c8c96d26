"""The sweep's progress display (tune/progress.py), driven without a Ray cluster: Tune's hooks are
called by hand with stub Trials and results shaped like the trainable's reports."""

from __future__ import annotations

import io
import logging
import pickle
import re

import pytest

pytest.importorskip("ray.tune")

from ray.tune.experiment import Trial  # noqa: E402

from tune.progress import SweepProgress  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
SEARCH_EPOCHS = 4


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _trial(tid: str, arch="dae", divergence="mmd", **lambdas) -> Trial:
    cfg = {"arch": arch, "lr": 1e-3, "divergence": divergence, "lambda_class": 1.0, "lambda_domain": 0.25, **lambdas}
    return Trial("xfer", stub=True, config=cfg, trial_id=tid)


def _report(cb, trials, trial, epoch, objective, best, best_epoch, seconds=10.0, **extra):
    """What the trainable reports every epoch (tune/trainable.py), plus Tune's own fields."""
    result = {"epoch": epoch, "timesteps_total": epoch, "objective": objective, "best_objective": best,
              "best_epoch": best_epoch, "improved": best == objective, "sel/agreement": objective,
              "peak_val_balanced_accuracy": 0.6, "node_id": "n1", "time_this_iter_s": seconds,
              "training_iteration": epoch, **extra}
    trial.update_last_result(result)
    cb.on_trial_result(iteration=0, trials=trials, trial=trial, result=result)


def _start(cb, trials, trial):
    trials.append(trial)
    trial.set_status(Trial.RUNNING)
    cb.on_trial_start(iteration=0, trials=trials, trial=trial)


def _complete(cb, trials, trial):
    cb.on_trial_complete(iteration=0, trials=trials, trial=trial)  # Tune calls it while still RUNNING
    trial.set_status(Trial.TERMINATED)


def _sweep(cb: SweepProgress, clock: Clock) -> dict:
    """Four trials on two slots: A completes, B is stopped by ASHA, C errors, D stops early by its
    own patience (completed). Returns the status lines taken on the way."""
    trials: list = []
    seen = {}
    cb.setup(num_samples=4, total_num_samples=4)
    a, b, c, d = (_trial(f"abc_0000{i}") for i in range(4))
    _start(cb, trials, a)
    _start(cb, trials, b)
    seen["before_any_epoch"] = cb.status_line()
    clock.t = 10
    _report(cb, trials, a, 1, 0.50, 0.50, 1)
    _report(cb, trials, b, 1, 0.60, 0.60, 1)
    cb.on_step_end(iteration=1, trials=trials)
    clock.t = 20
    _report(cb, trials, a, 2, 0.70, 0.70, 2)
    _report(cb, trials, b, 2, 0.55, 0.60, 1)
    _complete(cb, trials, b)                       # ASHA stops B at its rung (epoch 2 of 4)
    _start(cb, trials, c)
    clock.t = 30
    cb.on_step_end(iteration=2, trials=trials)     # 30 s since the start: a periodic line
    seen["at_30"] = cb.status_line()
    clock.t = 35
    cb.on_step_end(iteration=3, trials=trials)     # 5 s later: none
    clock.t = 40
    _report(cb, trials, a, 3, 0.72, 0.72, 3)
    _report(cb, trials, c, 1, 0.40, None, 0)        # warm-up: no best epoch yet
    clock.t = 50
    _report(cb, trials, a, 4, 0.71, 0.72, 3)
    _complete(cb, trials, a)
    c.get_error = lambda: RuntimeError("ray::ImplicitFunc.train()\n  ...\nValueError: lr too high")
    c.set_status(Trial.ERROR)                       # Tune marks it ERROR before on_trial_error
    cb.on_trial_error(iteration=4, trials=trials, trial=c)
    _start(cb, trials, d)
    clock.t = 59
    cb.on_step_end(iteration=5, trials=trials)
    clock.t = 60
    _report(cb, trials, d, 1, 0.65, 0.65, 1)
    cb.on_step_end(iteration=6, trials=trials)     # 30 s after the last periodic line
    _report(cb, trials, d, 2, 0.80, 0.80, 2)
    _report(cb, trials, d, 3, 0.79, 0.80, 2, stopped_early=True)
    _complete(cb, trials, d)
    clock.t = 75
    cb.on_experiment_end(trials=trials)
    seen["trials"] = trials
    return seen


def test_plain_lines_counts_best_eta_cadence_and_final_line():
    out, clock = io.StringIO(), Clock()
    cb = SweepProgress(4, SEARCH_EPOCHS, "agreement", "demo", mode="plain", interval_s=30, stream=out, clock=clock)
    seen = _sweep(cb, clock)
    text = out.getvalue()
    lines = text.splitlines()
    assert not ANSI.search(text) and "\x1b" not in text
    assert lines[0].startswith("sweep 'demo': 4 trials of up to 4 epochs; progress every 30 s")

    # before any epoch was timed: counts, no best, no estimate
    assert "0 completed, 0 stopped by ASHA, 0 errored, 2 running, 2 pending (of 4)" in seen["before_any_epoch"]
    assert "| best none yet |" in seen["before_any_epoch"] and "left ?" in seen["before_any_epoch"]

    # the periodic lines: at 30 s and at 60 s only (none at 10, 35, 59 s)
    periodic = [ln for ln in lines if ln.startswith("sweep 'demo': ") and "(of 4)" in ln]
    assert len(periodic) == 2
    at30 = periodic[0]
    assert at30 == seen["at_30"]
    assert "0 completed, 1 stopped by ASHA, 0 errored, 2 running, 1 pending (of 4)" in at30
    assert ("best agreement 0.7000: trial abc_00000, epoch 2 (arch=dae, divergence=mmd, lambda_class=1, "
            "lambda_domain=0.25)") in at30
    # ETA: mean epoch 10 s; B (the one ended trial) ran 2 epochs, so the pending trial is expected
    # to run 2, A (at 2) at least 1 more, C (at 0) 2: 5 epochs x 10 s over 2 slots = 25 s
    assert "elapsed 0:00:30, left ~0:00:25" in at30
    assert "1 completed, 1 stopped by ASHA, 1 errored, 1 running, 0 pending (of 4)" in periodic[1]

    # one line per trial that ended, with the shared status rule (tune.trials.trial_status)
    ended = [ln for ln in lines if ln.startswith("trial ")]
    assert ended == [
        "trial abc_00001 stopped by ASHA after 2/4 epochs, best agreement 0.6000 [1/4 done]",
        "trial abc_00000 completed after 4/4 epochs, best agreement 0.7200 [2/4 done]",
        "trial abc_00002 errored after 1/4 epochs: ValueError: lr too high [3/4 done]",
        "trial abc_00003 completed (stopped early by its own patience) after 3/4 epochs, best agreement 0.8000 "
        "[4/4 done]",
    ]
    assert lines[-1] == ("sweep 'demo' finished: 4 of 4 trials (2 completed, 1 stopped by ASHA, 1 errored) in 0:01:15 | "
                         "best agreement 0.8000: trial abc_00003, epoch 2 (arch=dae, divergence=mmd, lambda_class=1, "
                         "lambda_domain=0.25)")
    assert cb.counts() == {"completed": 2, "stopped_by_asha": 1, "errored": 1, "interrupted": 0, "running": 0,
                           "pending": 0}
    assert cb.eta() == 0.0


def test_a_resumed_sweeps_finished_trials_count_from_their_status():
    """After --resume Tune hands back finished trials as TERMINATED / ERROR, without hooks."""
    cb = SweepProgress(5, SEARCH_EPOCHS, mode="plain", stream=io.StringIO(), clock=Clock())
    done, asha, err, run = (_trial(f"r_{i}") for i in range(4))
    done.update_last_result({"epoch": 4, "best_objective": 0.9})
    asha.update_last_result({"epoch": 1, "best_objective": 0.95})
    err.update_last_result({"epoch": 2, "best_objective": 0.99})   # errored: never the best
    for t, s in ((done, Trial.TERMINATED), (asha, Trial.TERMINATED), (err, Trial.ERROR), (run, Trial.RUNNING)):
        t.set_status(s)
    trials = [done, asha, err, run]
    cb.on_step_end(iteration=1, trials=trials)
    assert cb.counts() == {"completed": 1, "stopped_by_asha": 1, "errored": 1, "interrupted": 0, "running": 1,
                           "pending": 1}
    assert cb.best()[1] is asha


def test_a_sweep_stopped_on_a_signal_counts_its_cut_trials_as_interrupted():
    """note_stop (tune.stop.CleanStop on SIGTERM / Ctrl+C): the trials this driver started that had not
    ended are interrupted, not stopped by ASHA; a resumed sweep's finished trials keep their status; the
    final line says the sweep was stopped, not that it finished."""
    from tune.progress import note_stop

    out, clock = io.StringIO(), Clock()
    cb = SweepProgress(5, SEARCH_EPOCHS, "agreement", "demo", mode="plain", stream=out, clock=clock)
    old, done, cut, grp = _trial("s_0"), _trial("s_1"), _trial("s_2"), _trial("s_3")
    trials = [old, done, cut, grp]
    old.update_last_result({"epoch": 2, "best_objective": 0.5})   # ASHA-stopped before the resume
    old.set_status(Trial.TERMINATED)
    cb.setup()
    for t in (done, cut, grp):
        t.set_status(Trial.RUNNING)
        cb.on_trial_start(iteration=0, trials=trials, trial=t)
    done.update_last_result({"epoch": 4, "best_objective": 0.7})
    cb.on_trial_complete(iteration=1, trials=trials, trial=done)
    done.set_status(Trial.TERMINATED)
    for t in (cut, grp):
        t.update_last_result({"epoch": 1, "best_objective": 0.6})
        cb.on_trial_result(iteration=2, trials=trials, trial=t, result=t.last_result)
    clock.t += 20
    note_stop("SIGTERM")
    cb.on_trial_complete(iteration=3, trials=trials, trial=grp)  # its process got the signal too: its loop ended
    for t in (cut, grp):
        t.set_status(Trial.TERMINATED)                           # what Tune's cleanup leaves
    cb.on_experiment_end(trials=trials)
    assert cb.counts() == {"completed": 1, "stopped_by_asha": 1, "errored": 0, "interrupted": 2, "running": 0,
                           "pending": 1}
    lines = out.getvalue().splitlines()
    assert [ln for ln in lines if ln.startswith("trial ")] == [
        "trial s_1 completed after 4/4 epochs, best agreement 0.7000 [2/5 done]"]   # none for the cut trials
    assert lines[-1] == (
        "sweep 'demo' stopped by SIGTERM after 0:00:20: 2 of 5 trials ended (1 completed, 1 stopped by ASHA, "
        "0 errored), 2 interrupted, 1 not started | best agreement 0.7000: trial s_1 (arch=dae, divergence=mmd, "
        "lambda_class=1, lambda_domain=0.25)")


def test_rich_mode_renders_the_same_counts():
    from rich.console import Console

    out, clock = io.StringIO(), Clock()
    cb = SweepProgress(4, SEARCH_EPOCHS, "agreement", "demo", mode="rich", stream=out, clock=clock)
    seen = _sweep(cb, clock)
    text = ANSI.sub("", out.getvalue())
    assert "\x1b[" in out.getvalue()                     # a terminal display
    assert "[green]" not in text and "[/]" not in text    # the panel redrawn while a line prints keeps its styles
    assert "trial abc_00001 stopped by ASHA after 2/4 epochs" in text
    assert "2 completed  1 stopped by ASHA  1 errored  0 running  0 pending  (of 4)" in text
    assert "sweep 'demo' finished: 4 of 4 trials (2 completed, 1 stopped by ASHA, 1 errored)" in text
    # the panel alone, mid-sweep state
    cb2 = SweepProgress(4, SEARCH_EPOCHS, "agreement", "demo", mode="rich", stream=io.StringIO(), clock=Clock())
    trials = seen["trials"][:2]
    trials[0].set_status(Trial.RUNNING)
    cb2.on_trial_start(iteration=0, trials=trials, trial=trials[0])
    buf = io.StringIO()
    Console(file=buf, force_terminal=True, width=160).print(cb2.renderable())
    panel = ANSI.sub("", buf.getvalue())
    assert "0 completed  1 stopped by ASHA  0 errored  1 running  2 pending  (of 4)" in panel
    assert "λ_class 1" in panel and "xfer tune: demo" in panel
    cb2.close()


def test_pickles_without_its_stream_or_display_and_starts_afresh():
    """The callback travels in tuner.pkl (Tuner.restore): no console, stream or state in it."""
    out, clock = io.StringIO(), Clock()
    cb = SweepProgress(4, SEARCH_EPOCHS, "agreement", "demo", mode="rich", stream=out, clock=clock)
    _sweep(cb, clock)
    again = pickle.loads(pickle.dumps(cb))
    assert (again.n_trials, again.search_epochs, again.objective, again.name, again.mode) == \
           (4, SEARCH_EPOCHS, "agreement", "demo", "rich")
    assert again._stream is None and again._live is None and again._ended == {} and again._clock is None
    fresh = SweepProgress(3, 2)
    assert pickle.loads(pickle.dumps(fresh)).counts([]) == {"completed": 0, "stopped_by_asha": 0, "errored": 0,
                                                            "interrupted": 0, "running": 0, "pending": 3}


def test_a_failing_hook_never_breaks_the_sweep(caplog):
    out = io.StringIO()
    cb = SweepProgress(2, SEARCH_EPOCHS, mode="plain", stream=out, clock=Clock())
    t = _trial("x_1")
    with caplog.at_level(logging.WARNING, logger="tune.progress"):
        cb.on_trial_result(iteration=0, trials=[t], trial=t, result=None)    # not a dict
        cb.on_trial_result(iteration=0, trials=[t], trial=t, result=None)
        cb.on_step_end(iteration=1, trials=[object()])                         # not a Trial
    assert len([r for r in caplog.records if "progress display" in r.getMessage()]) == 1
    cb.on_experiment_end(trials=[])
    assert out.getvalue().splitlines()[-1].startswith("sweep 'sweep' ended: 0 of 2 trials")
