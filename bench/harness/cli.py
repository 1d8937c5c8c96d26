"""The command line the pair benchmarks share (sweep_objective_eval, selection_objective,
asha_savings and the other studies over prepared pairs):

    python -m bench.<script> run ROOT --pairs 401 402 [options] [--json FILE]
    python -m bench.<script> report FILE
"""

from __future__ import annotations

import argparse
from typing import Callable


def pairs_cli(doc: str, options: Callable[[argparse.ArgumentParser], None],
              report_nargs: str | None = None,
              more: dict[str, Callable[[argparse.ArgumentParser], None]] | None = None,
              argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed `run` / `report` arguments; `options` adds the run's own (its --json among them);
    `more`: other commands over ROOT --pairs, each with its own options."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, opts in {"run": options, **(more or {})}.items():
        r = sub.add_parser(name)
        r.add_argument("root")
        r.add_argument("--pairs", type=int, nargs="+", required=True)
        opts(r)
    sub.add_parser("report").add_argument("json", nargs=report_nargs)
    return ap.parse_args(argv)
