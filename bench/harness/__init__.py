"""The one harness of the benchmarks: running a command, simulating a pair into a store,
the standard error of a balanced accuracy, result files and the shared command line.

Every script in bench/ imports what it shares with another from here (never from another
script) and runs from the repository root as `python -m bench.<script>`. Importing the harness
imports no torch, Ray or Optuna: the GPU machine runs some scripts without Ray or Optuna.
"""

from .asha import Asha
from .cli import pairs_cli
from .commands import ROOT, XFER, Ran, fit_seconds, git_head, run, run_xfer
from .pairs import (TEST, TRAIN, data_flags, pair_data, pair_flags, pair_settings, population_tune_argv,
                    prepare_pairs, simulate_into_store)
from .results import RESULTS, machine, read_results, write_results
from .stats import (PEAK_BASELINES, balanced_accuracy_se, best_plain_baseline, confusion_counts, confusion_se,
                    mean_se, summary, summary_se, with_se)

__all__ = ["Asha", "pairs_cli", "ROOT", "XFER", "Ran", "fit_seconds", "git_head", "run", "run_xfer", "TEST",
           "TRAIN", "data_flags", "pair_data", "pair_flags", "pair_settings", "population_tune_argv",
           "prepare_pairs", "simulate_into_store", "RESULTS", "machine", "read_results", "write_results",
           "PEAK_BASELINES", "balanced_accuracy_se", "best_plain_baseline", "confusion_counts", "confusion_se",
           "mean_se", "summary", "summary_se", "with_se"]
