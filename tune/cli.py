"""The `xfer tune` subcommand (registered with the xfer command through the
"xfer.commands" entry point, so that xfer itself never imports Ray)."""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger(__name__)


def register(sub) -> None:
    """`xfer tune` and `xfer demo` (tune.driver and Ray are imported only when they run)."""
    from xfer.flags import add_data_arguments, add_train_arguments

    p = sub.add_parser("tune", help="hyperparameter sweep: Ray Tune + OptunaSearch + ASHA over Ray Train workers",
                       description="`xfer tune`: OptunaSearch proposes, ASHA stops the weak, Ray runs the trials "
                                   "(README: xfer tune).")
    add_data_arguments(p)
    add_train_arguments(p, sweep=True)
    add_sweep_arguments(p.add_argument_group("sweep"))
    p.set_defaults(func=cmd_tune)
    add_demo_parser(sub)


def add_sweep_arguments(g) -> None:
    """The sweep's own flags: budget, space, scheduler, final model, cluster, storage, display."""
    g.add_argument("--n_trials", type=int, default=24,
                   help="trials to run (default 24: the study's pick, README: xfer tune, Design)")
    g.add_argument("--search_epochs", type=int, default=20, help="epochs per trial; ASHA's max_t (default 20)")
    g.add_argument("--space", help="a built-in space, `centred` (around the shipped defaults) or `broad` (every "
                                   "architecture, divergence and width), or a space file (YAML/JSON, see tune/space.py); "
                                   "default: centred, the study's pick (README: xfer tune, Space)")
    g.add_argument("--scheduler", choices=("asha", "fifo"), default="asha",
                   help="asha (default): stop weak trials at ASHA's rungs; fifo: run every trial its whole budget")
    g.add_argument("--rungs", choices=("adapted", "after_warmup", "epochs"), default="adapted",
                   help="what ASHA's rungs count: adapted (default) the epochs after each trial's own warm-up, so no "
                        "trial is judged before it has an objective value; after_warmup: epochs, judged only once "
                        "warmed; epochs: plain epochs")
    g.add_argument("--grace_period", type=int, default=0,
                   help="ASHA's first rung, in --rungs units (default search_epochs/4: 5 adapted epochs at 20)")
    g.add_argument("--reduction_factor", type=int, default=2, help="ASHA reduction factor (default 2)")
    g.add_argument("--asha_after_warmup", action="store_true", help="the same as --rungs after_warmup")
    g.add_argument("--checkpoint_every", type=int, default=0,
                   help="checkpoint every N epochs; 0 (default): as often as keeps writing within 5%% of a trial's "
                        "compute (and at the end, and at an ASHA rung after a new best epoch)")
    g.add_argument("--report_every", type=int, default=0, metavar="N",
                   help="a trial reports to the driver every N epochs; 0 (default): at most once a second. Always "
                        "at the epochs ASHA judges, at checkpoints and at the end; the epochs between still reach "
                        "Optuna's study (BENCHMARKS.md: Ray's costs that are ours)")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard logs (tensorboard --logdir <storage>); off by default: ~4 ms of the "
                        "driver's time per report")
    g.add_argument("--final_model", choices=("greedy", "within_se", "top", "best"), default="greedy",
                   help="how best_model.pt is made from the trials judged on the same footing (the ones that ran "
                        "their whole budget): greedy (default) adds trials while the average's own objective rises; "
                        "within_se: those within one standard error of the best; top: the top --final_ensemble; "
                        "best: the best alone. Never below the shipped defaults' own trial (README: 'The final model')")
    g.add_argument("--final_ensemble", type=int, default=8, metavar="K",
                   help="at most K trials in best_model.pt (default 8); 1: the best trial alone")
    g.add_argument("--population", type=int, default=1, metavar="P",
                   help="members per trial: P configurations of one shape trained together as one batched model on "
                        "the trial's CPU or GPU share, each still its own Optuna trial, trials.csv row and ASHA "
                        "decision (default 1: one configuration per trial; README: xfer tune, Populations)")
    g.add_argument("--max_failures", type=int, default=2, help="retries of a failed trial (default 2)")
    g.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    g.add_argument("--num_cpus", type=int, help="CPUs of the local cluster (default: all)")
    g.add_argument("--num_gpus", type=int, help="GPUs of the local cluster (default: all)")
    g.add_argument("--cpus_per_trial", type=float, default=1.0)
    g.add_argument("--gpus_per_trial", type=float, default=0.0, help="GPU share per trial, e.g. 0.25 = 4 trials per GPU")
    g.add_argument("--num_workers", type=int, default=1, help="Ray Train workers per trial (data parallel)")
    g.add_argument("--trainer", choices=("auto", "function", "torch"), default="auto",
                   help="function: the loop inside the Tune trial (fast path); torch: a Ray Train TorchTrainer "
                        "per trial; auto: torch only when --num_workers > 1")
    g.add_argument("--storage", help="where Tune keeps results and checkpoints: a shared path or a URI such as "
                                     "s3://bucket/sweeps (default: <output_folder>/ray_results); trials on every node "
                                     "write there")
    g.add_argument("--resume", action="store_true", help="finish the sweep in --output_folder after a crash")
    g.add_argument("--name", default="sweep", help="sweep name (Tune experiment and Optuna study)")
    g.add_argument("-v", "--verbose", dest="tune_verbose", action="store_true",
                   help="Ray Tune's own status tables and Ray's INFO logs instead of the compact progress display")
    g.add_argument("--progress_every", type=float, default=30.0, metavar="SECONDS",
                   help="seconds between progress lines when the output is not a terminal (default 30)")
    g.add_argument("--reuse_actors", action=argparse.BooleanOptionalAction, default=True,
                   help="fast path: run the next trial in a finished trial's actor (default; ~2 s saved per trial); "
                        "--no-reuse_actors gives each trial its own actor, named after it in the Ray dashboard")


def add_demo_parser(sub) -> None:
    d = sub.add_parser("demo", help="the main job on built-in simulated data: simulate two cell lines, "
                                    "then a real local Ray Tune sweep (what `make demo` runs)")
    d.add_argument("--size", default="small", help="simulated size (tiny | small | medium | research; old name of research: seed)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--output_folder", default="demo_output")
    d.add_argument("--n_trials", type=int, default=24)
    d.add_argument("--search_epochs", type=int, default=20)
    d.add_argument("--num_cpus", type=int, default=2)
    d.add_argument("--address", help="run the sweep on this Ray cluster (e.g. `auto` after cluster/local_cluster.sh "
                                     "start), whose dashboard stays up after the demo (default: a local one for the "
                                     "demo's duration)")
    d.add_argument("-v", "--verbose", dest="tune_verbose", action="store_true",
                   help="Ray Tune's own status tables instead of the compact progress display")
    d.set_defaults(func=cmd_demo)


def sweep_request(args):
    """`xfer tune`'s flags as a SweepRequest: --arch_type / --divergence_type (comma lists: the
    choices searched) and --set fix the space; the other config flags set every trial's config."""
    from xfer.config import parse_set
    from xfer.flags import config_overrides, sources_from_args

    from .request import SweepRequest

    fixed = {}
    for flag, key in (("arch_type", "arch"), ("divergence_type", "divergence")):
        v = getattr(args, flag, None)
        if v is not None:
            choices = [c.strip() for c in v.split(",") if c.strip()]
            fixed[key] = choices[0] if len(choices) == 1 else {"type": "categorical", "choices": choices}
    fixed.update(parse_set(getattr(args, "set", None)))
    return SweepRequest(
        sources=sources_from_args(args), output_folder=args.output_folder, config_path=args.config_path,
        overrides=config_overrides(args, skip=("arch_type", "divergence_type", "set")), fixed=fixed,
        space=args.space, n_trials=args.n_trials, search_epochs=args.search_epochs, scheduler=args.scheduler,
        rungs="after_warmup" if args.asha_after_warmup else args.rungs, grace_period=args.grace_period,
        reduction_factor=args.reduction_factor, checkpoint_every=args.checkpoint_every,
        report_every=args.report_every, tensorboard=args.tensorboard, final_model=args.final_model,
        final_ensemble=args.final_ensemble, population=args.population, max_failures=args.max_failures,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial, num_workers=args.num_workers,
        trainer=args.trainer, storage=args.storage, name=args.name, reuse_actors=args.reuse_actors)


def run_options(args):
    from .request import RunOptions

    return RunOptions(address=args.address, num_cpus=args.num_cpus, num_gpus=getattr(args, "num_gpus", None),
                      verbose=args.tune_verbose, progress_every=args.progress_every)


def cmd_tune(args) -> int:
    from xfer.pipeline import format_table

    from .final_model import final_model_source
    from .driver import run  # Ray and torch: only when a sweep runs
    from .stop import SweepStopped

    try:
        res = run(None, resume=args.output_folder, options=run_options(args)) if args.resume else \
            run(sweep_request(args), options=run_options(args))
    except SweepStopped as e:  # SIGTERM or Ctrl+C: the state is saved, Ray is shut down (tune.stop)
        print(f"xfer tune: {e}", file=sys.stderr)
        return e.exit_code
    sw, df, best = res["sweep"], res["table"], res["best"]
    counts = df["status"].value_counts().to_dict()
    print(f"\nsweep '{sw.name}': {len(df)} trials in {res['wall_seconds']:.1f} s "
          f"({', '.join(f'{v} {k}' for k, v in counts.items())})")
    print(f"best trial {best['trial_id']}: {best['objective']} {best['value']:.3f} at epoch {best['best_epoch']} "
          f"(arch {best['params']['arch']}, divergence {best['params']['divergence']})")
    final = best["final_model"]
    if final["members"]:
        print(f"best_model.pt: {final_model_source(final)}: "
              + ", ".join(f"{m['trial_id']} {m['value']:.3f}" for m in final["members"])
              + (f"; its {best['objective']} {final['objective']:.3f}" if len(final["members"]) > 1 else ""))
    if res["metrics"] is not None:
        print(format_table(res["metrics"]))
    print(f"results: {sw.output}/ (best_params.json, trials.csv, trials.parquet, optuna_study.db, best_model.pt"
          f"{', metrics.json' if res['metrics'] is not None else ''})"
          + (f"; TensorBoard: tensorboard --logdir {sw.storage}" if sw.tensorboard else ""))
    if res["dashboard"]:
        print(f"Ray dashboard: http://{res['dashboard']} (while this process runs; token: `ray get-auth-token`)")
    if res.get("report"):
        print(f"report: {res['report']}")
    return 0


def cmd_demo(args) -> int:
    """simulate -> store -> sweep -> scored best trial, all under --output_folder."""
    import json
    import shutil
    import time
    from pathlib import Path

    from xfer.cli import build_parser
    from xfer.data.simulate import simulate_pair, write_simulation
    from xfer.data.store import CellStore

    if getattr(args, "address", None) and args.address != "local":  # the cluster answers before anything is made
        from .ray_start import cluster_nodes, ray_environment

        ray_environment()
        cluster_nodes(args.address, f"--address {args.address}", auto_token=args.address == "auto")
    out = Path(args.output_folder).resolve()
    t0 = time.perf_counter()
    lines = simulate_pair(args.size, seed=args.seed)
    write_simulation(lines, out / "data", formats=("csv",))
    store = CellStore(str(out / "store"))
    for ln in lines:
        for ds in (ln.gex, ln.peak):
            store.write(ds, overwrite=True)
    a, b = lines
    print(f"demo: simulated {a.name} ({a.gex.n_cells} cells) and {b.name} ({b.gex.n_cells} cells), "
          f"{a.gex.n_features} genes, {a.peak.n_features}/{b.peak.n_features} peaks, in {time.perf_counter() - t0:.0f} s; "
          f"CSVs in the research code's layout in {out / 'data'}, store in {out / 'store'}")
    shutil.rmtree(out / "sweep", ignore_errors=True)
    data = ["--store", str(out / "store"), "--src_csv", f"store:{a.gex.name}", "--tgt_csv", f"store:{a.peak.name}",
            "--test_csv", f"store:{b.gex.name}", "--sup_peak_csv", f"store:{b.peak.name}", "--source_model", "pca"]
    argv = ["tune", *data, "--n_trials", str(args.n_trials), "--search_epochs", str(args.search_epochs),
            "--output_folder", str(out / "sweep"), "--name", "demo"]
    argv += ["--address", args.address] if getattr(args, "address", None) else ["--num_cpus", str(args.num_cpus)]
    if getattr(args, "tune_verbose", False):
        argv.append("--verbose")
    rc = cmd_tune(build_parser().parse_args(argv))
    if rc:
        return rc
    # the shipped defaults (their ensemble of three), trained for the trials' --search_epochs epochs
    from xfer.pipeline import run_train

    shutil.rmtree(out / "defaults", ignore_errors=True)
    print(f"\ndemo: training the shipped defaults ({args.search_epochs} epochs as in the trials, the shipped "
          "ensemble of three)")
    from xfer.flags import config_from_args, sources_from_args

    train_args = build_parser().parse_args(["train", *data, "--epochs", str(args.search_epochs),
                                            "--output_folder", str(out / "defaults")])
    defaults = run_train(sources_from_args(train_args), config_from_args(train_args), out / "defaults", "cpu").metrics
    swept = json.loads((out / "sweep" / "metrics.json").read_text())
    print(demo_summary(b.name, swept, defaults, str(out / "sweep" / "metrics.json")))
    if (out / "sweep" / "report.html").exists():
        print(f"report: {out / 'sweep' / 'report.html'}")
    if not getattr(args, "address", None):
        print("to inspect the trials in the Ray dashboard after the sweep, run it on a cluster that stays up: "
              "cluster/local_cluster.sh start --workers 0 --cpus 2 && eval \"$(cluster/local_cluster.sh env)\" && "
              "xfer demo --address auto  (README: Inspecting sweeps)")
    return 0


def demo_summary(test_line: str, swept: dict, defaults: dict, swept_path: str = "metrics.json") -> str:
    """The sweep's final model beside the shipped defaults and the plain baselines, on the test line."""
    from xfer.evaluate import METRIC_KEYS

    n = swept["model"].get("n_members", 1)
    rows = [(f"sweep's final model ({'one trial' if n == 1 else f'{n} trials'}, {swept['model']['objective']})",
             swept["peak_test"]),
            (f"shipped defaults ({defaults['model']['config']['ensemble']} members)", defaults["peak_test"])]
    rows += [(f"baseline {k}", v["peak_test"]) for k, v in swept["baselines"].items() if "peak_test" in v]
    lines = [f"test line {test_line}, accessibility (PEAK):",
             f"  {'':44s}" + "".join(f"{k:>19s}" for k in METRIC_KEYS)]
    lines += [f"  {name:44s}" + "".join(f"{r[k]:19.3f}" for k in METRIC_KEYS) for name, r in rows]
    lines.append(f"  {'majority-class rate':44s}{swept['peak_test']['majority_rate']:19.3f}")
    from xfer.results import best_baseline

    name, base = best_baseline(swept, swept_path)  # the path names the file in an error
    ba = swept["peak_test"]["balanced_accuracy"]
    lines.append(f"  balanced accuracy: sweep − shipped defaults {ba - defaults['peak_test']['balanced_accuracy']:+.3f}, "
                 f"sweep − best plain baseline ({name}) {ba - base['balanced_accuracy']:+.3f}")
    return "\n".join(lines)
