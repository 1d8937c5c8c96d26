"""The `xfer` command.

    xfer simulate   write a simulated paired-multiome pair of cell lines
    xfer ingest     validate input files and write them to the Parquet cell store
    xfer embed      compute (or import) expression embeddings into the embedding store
    xfer train      train the CDANN and score it beside plain baselines
    xfer baseline   the plain baselines alone
    xfer predict    label new cells with a trained model (a checkpoint)
    xfer map-peaks  train the neural peak mapper between two lines' peak sets
    xfer store      list the datasets and embeddings in a store
    xfer results    one CSV row (and a Markdown table row) per trained model folder
    xfer report     report.html of a sweep or a training run (plotly, offline)

Commands of installed plugins join these: the tune package adds `xfer tune`
(Ray Tune sweeps) and `xfer demo` (simulation + a local sweep).

Every subcommand that reads data takes the same data flags (see
`xfer.data.inputs`). Errors in the user's input are reported as one line that
names the file and the field, with exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from .errors import XferError

log = logging.getLogger("xfer")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)


# ----------------------------------------------------------------------------- simulate

def cmd_simulate(args) -> int:
    from .data.simulate import simulate_pair, size_name, write_simulation
    from .data.store import CellStore

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = sorted(set(formats) - {"csv", "h5ad", "10x", "store"})
    if unknown:
        raise XferError(f"--formats: unknown format(s) {unknown}; choose from csv, h5ad, 10x, store")
    try:
        args.size = size_name(args.size)  # an old name ("seed") is accepted, with a note
    except ValueError:
        from .data.simulate import SIZES
        raise XferError(f"--size: unknown size '{args.size}'; choose from {', '.join(SIZES)}") from None
    t0 = time.perf_counter()
    size, settings = args.size, None
    if args.vary:  # the pair's assumptions (and cells per line) drawn from documented ranges
        from .data.simulate import draw_settings
        size, settings = draw_settings(args.seed, args.size)
    lines = simulate_pair(size, seed=args.seed, settings=settings)
    log.info("simulated %s in %.1f s", ", ".join(f"{ln.name}: {ln.gex.n_cells} cells" for ln in lines),
             time.perf_counter() - t0)
    file_formats = tuple(f for f in formats if f != "store")
    written = write_simulation(lines, args.out, formats=file_formats) if file_formats else {}
    if settings is not None:
        from dataclasses import asdict

        from .data.fs import write_json
        path = write_json(f"{args.out}/settings.json", {"seed": args.seed, "size": asdict(size),
                                                        "settings": settings.to_dict()})
        written.setdefault("settings", []).append(path)
    for fmt, paths in written.items():
        for p in paths:
            print(f"{fmt:5s} {p}")
    if "store" in formats:
        store = CellStore(args.store)
        for ln in lines:
            for ds in (ln.gex, ln.peak):
                man = store.write(ds, overwrite=args.overwrite)
                print(f"store store:{man.name}  ({man.n_cells} cells x {man.n_features} {man.modality} features) "
                      f"in {store.root.uri}")
    return 0


# ----------------------------------------------------------------------------- ingest

def cmd_ingest(args) -> int:
    from .data.inputs import ROLES
    from .data.store import CellStore
    from .flags import sources_from_args

    sources = sources_from_args(args)
    roles = sources.given()
    if not roles:
        raise XferError("ingest: give at least one input (--src_csv, --tgt_csv, --test_csv, --sup_peak_csv)")
    data = sources.load(roles)          # everything is read and validated before anything is written
    names = {r: (getattr(args, "name", None) if len(roles) == 1 and getattr(args, "name", None) else ds.name)
             for r, ds in data.items()}
    if len(set(names.values())) < len(names):
        raise XferError("ingest: two inputs would get the same dataset name "
                        f"({names}); rename a file or ingest them one at a time with --name")
    store = CellStore(args.store)
    print(f"{'role':9s} {'dataset':24s} {'cells':>7s} {'features':>9s} {'nnz':>11s}  labels")
    for r, ds in data.items():
        man = store.write(ds, names[r], overwrite=args.overwrite)
        counts = "/".join(f"{k}:{v}" for k, v in man.label_counts.items()) or "none"
        print(f"{r:9s} store:{man.name:18s} {man.n_cells:7d} {man.n_features:9d} {man.nnz:11d}  {counts}")
    print(f"store: {store.root.uri}  (use the datasets as e.g. {ROLES[roles[0]].flag} store:{names[roles[0]]})")
    return 0


# ----------------------------------------------------------------------------- embed

def cmd_embed(args) -> int:
    from .embed.command import MODEL_KEYS, run_embed
    from .flags import sources_from_args

    return run_embed(sources_from_args(args), args.source_model, {k: getattr(args, k, None) for k in MODEL_KEYS},
                     overwrite=bool(args.overwrite))


# ----------------------------------------------------------------------------- train / baseline

def cmd_train(args) -> int:
    from .flags import config_from_args, sources_from_args
    from .pipeline import format_table, run_train

    metrics = run_train(sources_from_args(args), config_from_args(args), args.output_folder, args.device).metrics
    m = metrics["model"]
    print(f"best epoch {m['best_epoch']} of {m['epochs_run']} (objective {m['objective']} {m['best_objective']:.3f}"
          f"{', stopped early' if m['stopped_early'] else ''}), {m['train_seconds']:.1f} s training")
    print(format_table(metrics))
    print(f"outputs: {args.output_folder}/ (best_model.pt, metrics.json, training_history.json, predictions_*.csv)")
    return 0


def cmd_baseline(args) -> int:
    from .flags import config_from_args, sources_from_args
    from .pipeline import format_table, run_baseline

    metrics = run_baseline(sources_from_args(args), config_from_args(args), args.output_folder)
    print(format_table(metrics))
    print(f"outputs: {args.output_folder}/metrics.json")
    return 0


def cmd_predict(args) -> int:
    from .flags import sources_from_args
    from .predict import predict_files

    predict_files(sources_from_args(args), args.checkpoint, args.output_folder, args.device)
    return 0


# ----------------------------------------------------------------------------- map-peaks

def cmd_map_peaks(args) -> int:
    from .data.inputs import DataSources
    from .data.neural_mapper import MAPPER_FILE, fit_mapper, write_mapper_folder
    from .errors import InputError

    sources = DataSources(tgt=args.source_peaks, sup_peak=args.target_peaks, store=args.store,
                          peak_modality=args.peak_modality, orient=args.orient)
    try:
        data = sources.load(["tgt", "sup_peak"])   # both read and checked before anything is fitted or written
    except InputError as e:  # the roles' own flag names in a message are this command's flags
        flags = {"--tgt_csv": "--source_peaks", "--sup_peak_csv": "--target_peaks"}
        if e.field not in flags:
            raise
        path, field, msg = e._args
        raise InputError(path, flags[field], msg.replace(field, flags[field])) from None
    mapper, stats = fit_mapper(data["tgt"], data["sup_peak"], design=args.design, dim=args.dim, epochs=args.epochs,
                               seed=args.seed, device=args.device, fill=args.fill, min_fraction=args.min_fraction)
    write_mapper_folder(mapper, stats, args.output_folder)    # computed first, then each file atomically
    o, q = stats["overlap"], stats["quality"]["unmapped"]
    print(f"{o['n_ref_mapped']} of {o['n_ref']} source peaks have a coordinate partner in the target line; the "
          f"network predicts {stats['n_network_outputs']} ({stats['design']}, fill {stats['fill']}), "
          f"{stats['fit_seconds']:.1f} s, {stats['file_bytes'] / 2**20:.1f} MiB")
    if q["n_peaks"]:
        f1 = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        print(f"held-out source cells, peaks without a partner: F1 {f1(q['neural']['f1'])} (zero fill "
              f"{f1(q['zero']['f1'])}, mean fill {f1(q['mean']['f1'])}), AUROC {f1(q['neural']['auroc'])}")
    print(f"outputs: {args.output_folder}/ ({MAPPER_FILE}, mapper_stats.json, mapper_report.md); use it with "
          f"--peak_mapper_method neural --peak_mapper {args.output_folder}/{MAPPER_FILE}")
    return 0


# ----------------------------------------------------------------------------- store

def cmd_store(args) -> int:
    from .data.embed_store import EmbeddingStore
    from .data.store import CellStore

    store = CellStore(args.store)
    names = store.names()
    print(f"store {store.root.uri}: {len(names)} dataset(s)")
    for n in names:
        m = store.manifest(n)
        counts = "/".join(f"{k}:{v}" for k, v in m.label_counts.items()) or "unlabelled"
        print(f"  store:{n:24s} {m.modality:4s} {m.n_cells:7d} x {m.n_features:<7d} nnz {m.nnz:<11d} "
              f"{counts:24s} hash {m.content_hash[:12]}")
    entries = EmbeddingStore(args.store).entries()
    if entries:
        print(f"{len(entries)} embedding(s)")
        for e in entries:
            print(f"  {e.get('embedder', '?'):18s} dataset {e.get('dataset_hash', '?')[:12]} dim {e.get('dim', '?')} "
                  f"cells {e.get('n_cells', '?')}{'  CORRUPTED' if e.get('corrupted') else ''}")
    return 0


# ----------------------------------------------------------------------------- results / report

def cmd_results(args) -> int:
    from .results import markdown_table, run_results

    rows = run_results(args.model_dirs, args.output_csv)
    print("accuracy / balanced accuracy per split\n")
    print(markdown_table(rows))
    print(f"\n{len(rows)} model(s) -> {args.output_csv}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    print(f"report: {write_report(args.output_folder)}")
    return 0


# ----------------------------------------------------------------------------- parser

def build_parser() -> argparse.ArgumentParser:
    from .flags import add_data_arguments, add_predict_arguments, add_store_argument, add_train_arguments

    p = argparse.ArgumentParser(prog="xfer", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_simulate_parser(sub, add_store_argument)

    s = sub.add_parser("ingest", help="validate inputs and write them to the Parquet cell store")
    add_data_arguments(s)
    s.add_argument("--name", help="dataset name when ingesting a single input (default: the file name's stem)")
    s.add_argument("--overwrite", action="store_true", help="replace datasets of the same name")
    s.set_defaults(func=cmd_ingest)

    from .embed.command import add_embed_arguments

    s = sub.add_parser("embed", help="compute (or import) Geneformer / scFoundation / PCA / ensemble embeddings "
                       "into the embedding store, once")
    add_data_arguments(s)
    add_embed_arguments(s)
    s.set_defaults(func=cmd_embed)

    s = sub.add_parser("train", help="train the CDANN on the training line and score it "
                       "(the original research code's train script)")
    add_data_arguments(s)
    add_train_arguments(s)
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("baseline", help="plain baselines only (majority, LSI+LR, aligned LSI, CORAL, GEX LR, markers)")
    add_data_arguments(s)
    add_train_arguments(s)
    s.set_defaults(func=cmd_baseline)

    s = sub.add_parser("predict", help="label new cells (--sup_peak_csv and/or --test_csv) with a trained model")
    add_data_arguments(s)
    add_predict_arguments(s)
    s.set_defaults(func=cmd_predict)

    _add_map_peaks_parser(sub, add_store_argument)

    s = sub.add_parser("store", help="list the datasets and embeddings in a store")
    add_store_argument(s)
    s.set_defaults(func=cmd_store)

    s = sub.add_parser("results", help="one row per model folder (xfer train / xfer tune outputs): the four splits, "
                       "the majority-class rate and the best plain baseline "
                       "(the original research code's comprehensive results)")
    s.add_argument("--model_dirs", nargs="+", required=True, metavar="DIR", help="folders holding metrics.json")
    s.add_argument("--output_csv", default="comprehensive_results.csv",
                   help="the CSV to write (default comprehensive_results.csv)")
    s.set_defaults(func=cmd_results)

    s = sub.add_parser("report", help="write report.html (self-contained, offline) for a sweep or training folder")
    s.add_argument("--output_folder", required=True, help="an `xfer tune` or `xfer train` output folder")
    s.set_defaults(func=cmd_report)

    for ep in _plugins():
        ep.load()(sub)  # e.g. `xfer tune` from the tune package (Ray stays out of xfer)

    return p


def _add_simulate_parser(sub, add_store_argument) -> None:
    s = sub.add_parser("simulate", help="write a simulated paired-multiome pair of cell lines")
    s.add_argument("--size", default="small",
                   help="tiny | small | medium | research (default small); research: the size of the original "
                        "research code's data, 7,432 and 7,728 cells, 28,105 genes, 92,328 peaks (old name: seed)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--vary", action="store_true",
                   help="draw the pair's assumptions and cells per line from the documented ranges "
                        "(xfer.data.simulate.VARIED_RANGES) with --seed; genes and peaks from --size; "
                        "writes settings.json")
    s.add_argument("--out", default="sim_data", help="output directory for files (default ./sim_data)")
    s.add_argument("--formats", default="csv,h5ad,10x,store",
                   help="comma list of csv, h5ad, 10x, store (default: all)")
    s.add_argument("--overwrite", action="store_true", help="replace store datasets of the same name")
    add_store_argument(s)
    s.set_defaults(func=cmd_simulate)


def _add_map_peaks_parser(sub, add_store_argument) -> None:
    from .data.neural_mapper import DEFAULT_DESIGN, DESIGNS, FILLS
    from .data.readers import ORIENTATIONS

    s = sub.add_parser("map-peaks", help="train the neural peak mapper: a small network that puts a target line's "
                       "peaks on a source (training) line's peaks, without labels (the original research code's "
                       "train_peak_mapper.py)")
    g = s.add_argument_group("data (a file: .csv/.tsv[.gz], .h5ad, .h5mu, 10x .h5; or store:NAME)")
    g.add_argument("--source_peaks", required=True, metavar="FILE|store:NAME",
                   help="the source (training) line's accessibility: the peaks the mapper predicts")
    g.add_argument("--target_peaks", required=True, metavar="FILE|store:NAME",
                   help="the target (test) line's accessibility: the peaks the mapper reads")
    g.add_argument("--peak_modality", default=None, metavar="NAME", help=".h5mu inputs: the accessibility modality "
                   "(default atac)")
    g.add_argument("--orient", choices=ORIENTATIONS, default="auto",
                   help="CSV orientation (default: detect)")
    add_store_argument(s)
    s.add_argument("--output_folder", required=True, help="where mapper.pt, mapper_stats.json and mapper_report.md go")
    s.add_argument("--design", choices=DESIGNS, default=DEFAULT_DESIGN,
                   help=f"source_adapter: trained on the source line's cells seen through the target's peaks; joint: "
                        f"also on the target's cells, on the peaks coordinates fill; shared: one encoder per line "
                        f"into a shared space, aligned on the overlapping peaks and by MMD (default {DEFAULT_DESIGN})")
    s.add_argument("--fill", choices=FILLS, default="unmapped",
                   help="unmapped: coordinate counts where a source peak has a partner, the network's calls on the "
                        "others (default); all: the network's calls on every source peak")
    s.add_argument("--dim", type=int, default=256, help="hidden width (default 256)")
    s.add_argument("--epochs", type=int, default=None,
                   help="at most this many epochs (default 60); early stopping on held-out source cells decides")
    s.add_argument("--min_fraction", type=float, default=0.05,
                   help="peaks non-zero in at least this share of a line's cells are fitted (default 0.05)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    s.set_defaults(func=cmd_map_peaks)


def _plugins():
    from importlib.metadata import entry_points

    return sorted(entry_points(group="xfer.commands"), key=lambda e: e.name)


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()  # reads the registries: an extension that fails to load is a user error
    except XferError as e:
        print(f"xfer: error: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if getattr(args, "output_folder", None) and not getattr(args, "resume", False):
            from .data.fs import check_output_folder

            check_output_folder(args.output_folder)   # before any work: a file there, or an unwritable parent
        return args.func(args)
    except XferError as e:
        print(f"xfer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001  a bug or an environment failure: one line, the traceback kept
        return _unexpected(args, e)


def _unexpected(args, e: BaseException) -> int:
    """One line naming the command and the exception, and where its full traceback went (a file;
    with -v, stderr as well). Exit status 1."""
    import os
    import tempfile
    import traceback

    text = "".join(traceback.format_exception(e))
    where = None
    try:
        fd, where = tempfile.mkstemp(prefix=f"xfer-{args.command}-", suffix=".traceback.txt")
        with os.fdopen(fd, "w") as f:
            f.write(f"xfer {' '.join(sys.argv[1:])}\n\n{text}")
    except OSError:
        where = None
    if args.verbose:
        sys.stderr.write(text)
    first = (str(e).strip().splitlines() or [""])[0]
    shown = f"full traceback in {where}" if where else "the full traceback: rerun with `xfer -v`"
    if where and not args.verbose:
        shown += f" (or rerun with `xfer -v {args.command} ...`)"
    print(f"xfer {args.command}: unexpected error: {type(e).__name__}: {first} ({shown})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
