"""A clean stop on SIGTERM (what a scheduler sends before SIGKILL: SLURM at its time limit or on
scancel, Kubernetes on an eviction): `xfer tune` saves the sweep's state, shuts its Ray down and
exits with 143 within the grace period, printing how to resume; `--resume` then finishes the sweep
with no trial repeated (tune/stop.py). Ctrl+C (SIGINT) stops it the same way, with exit 130, instead
of exporting the unfinished sweep as if it had finished. The SLURM script's forwarding of SIGTERM to the driver is
checked here too, with bash on a dummy driver (tests/test_slurm.py runs the script under SLURM).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import study_states

ROOT = Path(__file__).resolve().parents[1]
SBATCH = ROOT / "cluster" / "slurm_ray.sbatch"
GRACE_S = 30  # SLURM's default KillWait: SIGKILL this long after SIGTERM


# ----------------------------------------------------------------------------- tune.stop, no Ray

def test_sigterm_calls_the_handler_tunes_loop_installed():
    from tune.stop import CleanStop

    before = signal.getsignal(signal.SIGUSR1)
    calls = []
    try:
        with CleanStop() as stop:
            signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))  # as Tune's loop does
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)          # a second one changes nothing
            time.sleep(0.05)
        assert stop.requested and calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)
    assert signal.getsignal(signal.SIGTERM) != stop._on_signal  # the previous handler is back


def test_ctrl_c_stops_through_tunes_handler_and_a_second_one_stops_at_once(monkeypatch):
    """SIGINT stays with CleanStop while it is active (Tune's loop is told not to take it), asks Tune
    to stop as SIGTERM does, names itself to on_stop; a second Ctrl+C raises KeyboardInterrupt
    (no last save). Afterwards SIGINT's handler and TUNE_DISABLE_SIGINT_HANDLER are as before."""
    from tune.stop import CleanStop, SweepStopped

    monkeypatch.delenv("TUNE_DISABLE_SIGINT_HANDLER", raising=False)
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGINT)
    calls, told = [], []
    try:
        with CleanStop(on_stop=told.append) as stop:
            assert os.environ["TUNE_DISABLE_SIGINT_HANDLER"] == "1"
            signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))  # as Tune's loop does
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert stop.signum == signal.SIGINT and calls == [signal.SIGUSR1] and told == ["Ctrl+C (SIGINT)"]
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.5)
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before[0])
    assert signal.getsignal(signal.SIGINT) is before[1] and "TUNE_DISABLE_SIGINT_HANDLER" not in os.environ
    e = SweepStopped("/out", signal.SIGINT)
    assert e.exit_code == 130 and str(e) == ("stopped by Ctrl+C (SIGINT) before the sweep finished; resume with: "
                                             "xfer tune --resume --output_folder /out")
    assert SweepStopped("/out").exit_code == 143


def test_a_sigterm_before_tunes_loop_waits_for_its_handler():
    from tune.stop import CleanStop

    before = signal.getsignal(signal.SIGUSR1)
    calls = []
    try:
        with CleanStop() as stop:
            os.kill(os.getpid(), signal.SIGTERM)          # the Tuner is still being made
            time.sleep(0.2)
            assert stop.requested and calls == []
            signal.signal(signal.SIGUSR1, lambda s, f: calls.append(s))  # Tune's loop starts
            deadline = time.time() + 5
            while not calls and time.time() < deadline:
                time.sleep(0.02)
        assert calls == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, before)


def test_outside_the_main_thread_it_does_nothing():
    from tune.stop import CleanStop

    handler = signal.getsignal(signal.SIGTERM)
    seen = {}

    def body():
        with CleanStop() as stop:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
        seen["requested"] = stop.requested

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == {"handler": handler, "requested": False}


# ----------------------------------------------------------------------------- cluster/slurm_ray.sbatch

def _forwarding_block() -> str:
    """The script's lines from starting the driver to its exit status, with `xfer` a dummy."""
    text = SBATCH.read_text()
    m = re.search(r"^# >>> driver\b.*?\n(.*?)^# <<< driver\n", text, re.S | re.M)
    assert m, "cluster/slurm_ray.sbatch: no '# >>> driver' ... '# <<< driver' block"
    return m.group(1)


def test_the_sbatch_asks_for_sigterm_before_the_time_limit():
    lines = SBATCH.read_text().splitlines()
    sig = [ln for ln in lines if ln.startswith("#SBATCH --signal=")]
    assert sig == ["#SBATCH --signal=B:TERM@120"]         # to the batch shell, 120 s before the limit
    assert lines.index(sig[0]) < min(i for i, ln in enumerate(lines) if not ln.startswith("#"))


@pytest.mark.parametrize("driver_rc, saved", [(143, True), (143, False), (0, True)])
def test_the_sbatch_forwards_sigterm_to_the_driver_and_keeps_its_exit_status(tmp_path, driver_rc, saved):
    """The block runs in bash with a dummy `xfer` that, on SIGTERM, takes a while (saving; a
    second TERM changes nothing, as for the real driver) and exits with driver_rc; the batch shell gets SIGTERM (as from --signal=B:TERM or scancel -b),
    twice (a second TERM at the time limit must not cut the wait short). The resubmit line only when
    the sweep's settings were saved (saved: OUT/sweep.json exists), else: submit again."""
    out = tmp_path / "run1"
    out.mkdir()
    if saved:
        (out / "sweep.json").write_text("{}")
    bindir = tmp_path / "bin"
    bindir.mkdir()
    xfer = bindir / "xfer"
    xfer.write_text(f"""#!/bin/bash
echo "$@" > {tmp_path}/argv
trap 'trap "" TERM; echo got-term >> {tmp_path}/driver; sleep 1; echo saved >> {tmp_path}/driver; exit {driver_rc}' TERM
echo started > {tmp_path}/driver
for _ in $(seq 1 600); do sleep 0.1; done
exit 9
""")
    xfer.chmod(0o755)
    script = tmp_path / "block.sh"
    script.write_text("#!/bin/bash\nset -euo pipefail\n"
                      "head_ip=127.0.0.1 PORT=6379 STORE=/s NAME=n SRC=a TGT=b TEST= SUP_PEAK= N_TRIALS=2 EPOCHS=2\n"
                      f"CPUS_PER_TRIAL=1 GPUS_PER_TRIAL=0 STORAGE= EXTRA= RESUME= OUT={out}\n"
                      "REPO=/repo SLURM_JOB_ID=7\n" + _forwarding_block() + 'echo "rc=$rc"\n')
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    p = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        deadline = time.time() + 20
        while not (tmp_path / "driver").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        p.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        p.send_signal(signal.SIGTERM)
        stdout, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert (tmp_path / "driver").read_text().splitlines() == ["started", "got-term", "saved"], err
    assert f"rc={driver_rc}" in stdout, stdout + err          # the driver's status, not the interrupted wait's
    assert f"--output_folder {out}" in (tmp_path / "argv").read_text()
    if driver_rc == 143 and saved:
        assert "RESUME=1" in err and f"OUT={out}" in err  # how to resume the job
    else:
        assert "RESUME=1" not in stdout + err
        assert ("nothing to resume: submit the job again" in err) == (driver_rc == 143)


# ----------------------------------------------------------------------------- a real sweep

XFER = [sys.executable, "-m", "xfer.cli"]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "XFER_NODE_CACHE": os.environ.get("XFER_NODE_CACHE", "")
            or str(Path(os.environ.get("TMPDIR", "/tmp")) / "xfer_test_node_cache")}


def _tune_args(store, out, *extra):
    from conftest import SMALL_MODEL

    fix = [f"--set={k}={v}" for k, v in SMALL_MODEL.items() if k in ("hidden_dim", "latent_dim", "proj_hidden",
                                                                     "batch_size")]
    fix += ["--set=n_layers=1", "--set=n_components=16", "--set=disc_hidden=64", "--set=cls_hidden=32"]
    return ["tune", "--store", str(store), "--src_csv", "store:A_GEX", "--tgt_csv", "store:A_PEAK",
            "--output_folder", str(out), "--num_cpus", "2", "--cpus_per_trial", "1", "--space", "broad", *fix, *extra]


def _stat(pid: int):
    """(start time, state) of a process, None when it is gone (a zombie counts as gone: PID 1 here
    may not reap the processes a dead driver leaves)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else (fields[19], fields[0])


def _descendants(pid: int) -> dict[int, str]:
    """{pid: start time} of every process below `pid` (Ray's GCS, raylet, dashboard, workers)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                text = (d / "stat").read_text()
            except OSError:
                continue
            ppid = int(text[text.rindex(")") + 2:].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = {}, [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            st = _stat(c)
            if st is not None:
                out[c] = st[0]
                todo.append(c)
    return out


def _finished_trials(db) -> dict[int, tuple[float, str]]:
    """{Optuna trial number: (value, Ray trial id)} of the study's finished trials."""
    with sqlite3.connect(db) as c:
        rows = c.execute("select t.number, v.value, a.value_json from trials t join trial_values v using(trial_id) "
                         "join trial_user_attributes a on a.trial_id = t.trial_id and a.key = 'ray_trial_id' "
                         "where t.state in ('COMPLETE','PRUNED')").fetchall()
    return {n: (v, json.loads(rid)) for n, v, rid in rows}


def _run_until_stopped(argv, out, tmp_path, finished: int, tag: str, ctrl_c: bool = False):
    """Run `xfer` (argv) in its own session and, once `finished` of the study's trials have finished,
    SIGTERM the driver alone (as a scheduler's batch shell does) or, with ctrl_c, SIGINT its whole
    process group (what Ctrl+C in a terminal does: Ray's processes get it too); check the clean stop:
    exit 143 (130) within the grace period, the one resume line on stderr, nothing exported, none of
    the Ray processes below the driver left. Returns the finished trials counted before the signal."""
    log_err = tmp_path / f"{tag}.stderr.txt"
    with open(tmp_path / f"{tag}.stdout.txt", "w") as fo, open(log_err, "w") as fe:
        proc = subprocess.Popen(XFER + argv, env=_env(), stdout=fo, stderr=fe, start_new_session=True)
    deadline = time.time() + 300
    finished_before = 0
    rc = None
    try:
        while time.time() < deadline and proc.poll() is None:
            st = study_states(out / "optuna_study.db")
            finished_before = st.get("COMPLETE", 0) + st.get("PRUNED", 0)
            if finished_before >= finished:
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"{tag}: the sweep ended before it could be stopped:\n{log_err.read_text()[-3000:]}"
        ray_procs = _descendants(proc.pid)
        t0 = time.time()
        if ctrl_c:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        took = time.time() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = log_err.read_text()
    what, code = ("Ctrl+C (SIGINT)", 130) if ctrl_c else ("SIGTERM", 143)
    assert rc is not None, f"{tag}: no exit {GRACE_S} s after {what} (a scheduler would SIGKILL it now):\n{err[-3000:]}"
    assert rc == code, err[-3000:]
    print(f"{tag}: {what} after {finished_before} finished trials -> exit {rc} in {took:.1f} s; "
          f"{len(ray_procs)} Ray processes below the driver")
    resume = [ln for ln in err.splitlines() if "--resume" in ln]
    assert resume == [f"xfer tune: stopped by {what} before the sweep finished; resume with: "
                      f"xfer tune --resume --output_folder {out}"], err[-3000:]
    final = (tmp_path / f"{tag}.stdout.txt").read_text().splitlines()
    assert any(ln.startswith(f"sweep 'sweep' stopped by {what} after ") for ln in final), final[-5:]
    assert not any(" finished: " in ln for ln in final)
    assert "Tuner.restore" not in err                         # Tune's own hint is muted: one way to resume
    assert not (out / "trials.csv").exists() and not (out / "best_params.json").exists()  # no export of a stopped sweep
    assert len(ray_procs) >= 3                                # GCS, raylet, a trial's worker at least
    deadline = time.time() + 10                               # SIGKILLed stragglers may take a moment to go
    left = {p: s for p, s in ray_procs.items() if (_stat(p) or (None,))[0] == s}
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = {p: s for p, s in left.items() if (_stat(p) or (None,))[0] == s}
    assert not left, {p: Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left}
    return finished_before


def _results(out, done) -> dict[str, bytes]:
    """{Ray trial id: its result.json} of the finished trials `done` (_finished_trials)."""
    return {rid: (out / "ray_results" / "sweep" / rid / "result.json").read_bytes() for _, rid in done.values()}


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_sigterm_and_ctrl_c_stop_the_sweep_cleanly_and_resume_finishes_it(tmp_path, tiny_store):
    """SIGTERM to a new sweep's driver once 2 of its 6 trials finished, then Ctrl+C (SIGINT to its
    process group) to the `--resume` once 4 had: each stops cleanly; a last `--resume` finishes the
    sweep, no trial run twice."""
    out = tmp_path / "sweep"
    n = 6
    resume = ["tune", "--resume", "--output_folder", str(out), "--num_cpus", "2"]
    first = _run_until_stopped(_tune_args(tiny_store, out, "--n_trials", str(n), "--search_epochs", "6",
                                          "--grace_period", "6"), out, tmp_path, 2, "new sweep")
    assert 2 <= first < n
    done = _finished_trials(out / "optuna_study.db")
    results = _results(out, done)
    second = _run_until_stopped(resume, out, tmp_path, 4, "resume", ctrl_c=True)
    assert 4 <= second < n
    mid = _finished_trials(out / "optuna_study.db")
    assert all(mid[k] == v for k, v in done.items()) and _results(out, done) == results
    done, results = mid, _results(out, mid)

    r = subprocess.run(XFER + resume, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(out / "trials.csv")
    assert len(df) == n and df["trial_id"].is_unique and (df["status"] != "errored").all()
    after = _finished_trials(out / "optuna_study.db")
    with sqlite3.connect(out / "optuna_study.db") as c:
        n_study = c.execute("select count(*) from trials where state != 'FAIL'").fetchone()[0]
    assert len(after) == n and n_study == n                   # nothing lost, nothing run twice
    assert all(after[k] == v for k, v in done.items())        # finished trials kept their results...
    assert _results(out, done) == results                     # ...and were not trained again
    assert set(df["trial_id"]) == {rid for _, rid in after.values()}


# ----------------------------------------------------------------------------- a signal before Tune's loop

_SIGNAL_IN = """
import os, signal, sys
import tune.driver as d
phase, signame = sys.argv[1], sys.argv[2]
real = getattr(d, phase)
def wrapped(*a, **k):                       # the signal arrives while the driver is in this phase
    os.kill(os.getpid(), getattr(signal, signame))
    return real(*a, **k)
setattr(d, phase, wrapped)
from xfer.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_a_sigterm_while_the_data_is_prepared_leaves_nothing_to_resume(tmp_path, tiny_store):
    """SIGTERM during a new sweep's data preparation: exit 143 at once, one line saying there is
    nothing to resume yet (no sweep.json was written), no Ray started."""
    out = tmp_path / "sweep"
    r = subprocess.run([sys.executable, "-c", _SIGNAL_IN, "load_trial_data", "SIGTERM",
                        *_tune_args(tiny_store, out, "--n_trials", "2", "--search_epochs", "6")],
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 143, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("xfer tune:")]
    assert lines == [f"xfer tune: stopped by SIGTERM before the sweep started: nothing to resume yet (no "
                     f"{out / 'sweep.json'}); run the command again"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr and not (out / "sweep.json").exists()
    assert "Ray dashboard" not in r.stdout + r.stderr


@pytest.mark.ray
@pytest.mark.xdist_group("ray")
def test_ctrl_c_while_ray_starts_waits_for_it_then_resume_runs_the_sweep(tmp_path, tiny_store):
    """Ctrl+C while ray.init runs: the start is not cut halfway; then Ray is shut down, exit 130 and
    the resume line (sweep.json was written); `--resume` of that sweep, which has no Tune state and
    an empty study yet, runs it whole."""
    out = tmp_path / "sweep"
    with open(tmp_path / "stdout.txt", "w") as fo, open(tmp_path / "stderr.txt", "w") as fe:
        proc = subprocess.Popen([sys.executable, "-c", _SIGNAL_IN, "start_ray", "SIGINT",
                                 *_tune_args(tiny_store, out, "--n_trials", "2", "--search_epochs", "6")],
                                env=_env(), stdout=fo, stderr=fe, start_new_session=True)
    seen: dict[int, str] = {}                              # every process seen below the driver
    try:
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline:
            seen.update(_descendants(proc.pid))
            time.sleep(0.1)
        rc = proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    err = (tmp_path / "stderr.txt").read_text()
    assert rc == 130, err[-3000:]
    assert [ln for ln in err.splitlines() if ln.startswith("xfer tune:")] == [
        f"xfer tune: stopped by Ctrl+C (SIGINT) before any trial started; resume with: "
        f"xfer tune --resume --output_folder {out}"], err[-3000:]
    assert "Traceback" not in err and (out / "sweep.json").exists() and not (out / "trials.csv").exists()
    assert len(seen) >= 2                                  # Ray did start (GCS, raylet)...
    deadline = time.time() + 10                            # ...and none of its processes is left
    left = {p: t for p, t in seen.items() if (_stat(p) or (None,))[0] == t}
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = {p: t for p, t in left.items() if (_stat(p) or (None,))[0] == t}
    assert not left, {p: Path(f"/proc/{p}/cmdline").read_bytes()[:120] for p in left}

    r = subprocess.run(XFER + ["tune", "--resume", "--output_folder", str(out), "--num_cpus", "2"], env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    df = pd.read_csv(out / "trials.csv")
    assert len(df) == 2 and (df["status"] != "errored").all()
