"""The sweep's datasets put into the cell store before any trial starts: trials read them by name
and content hash (tune.data.DataSpec), the test line's without its labels."""

from __future__ import annotations


def ingest_for_trials(args) -> dict:
    """Put the sweep's datasets into the store (file inputs are ingested; the test line's without
    its labels, which only the final scoring reads from the given files) and return the DataSpec."""
    from xfer.data.inputs import STORE_PREFIX, load_inputs
    from xfer.data.store import CellStore

    from .data import DataSpec

    roles = ["src", "tgt"] + [r for r in ("test", "sup_peak") if getattr(args, f"{r}_csv", None)]
    data = load_inputs(args, roles, require=("src", "tgt"))
    store = CellStore(args.store)
    names, hashes = {}, {}
    for role in roles:
        given = getattr(args, f"{role}_csv")
        ds = data[role]
        if given.startswith(STORE_PREFIX) and not getattr(args, f"{role}_label_csv", None):
            names[role] = given[len(STORE_PREFIX):]
        elif role in ("test", "sup_peak"):
            names[role] = store.write(ds.without_labels(), f"{ds.name}_unlabelled").name
        else:
            names[role] = store.write(ds, ds.name).name
        hashes[f"{role}_hash"] = store.manifest(names[role]).content_hash
    return DataSpec(store=store.root.uri, **names, **hashes).to_dict()
