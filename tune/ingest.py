"""The sweep's datasets put into the cell store before any trial starts: trials read them by name
and content hash (tune.data.DataSpec), the test line's without its labels."""

from __future__ import annotations


def ingest_for_trials(sources, val_fraction: float) -> dict:
    """Put the sweep's datasets (xfer.data.inputs.DataSources) into the store (file inputs are
    ingested; the test line's without its labels, which only the final scoring reads from the
    given files) and return the DataSpec. The training labels are checked first
    (`check_training_labels`: every phase, enough cells for the validation split)."""
    from xfer.data.store import CellStore
    from xfer.prepare import check_training_labels

    from .data import DataSpec

    roles = ["src", "tgt"] + [r for r in ("test", "sup_peak") if sources.matrix(r) is not None]
    data = sources.load(roles, require=("src", "tgt"))
    check_training_labels(data["src"], val_fraction)
    store = CellStore(sources.store)
    names, hashes = {}, {}
    for role in roles:
        ds = data[role]
        if sources.from_store(role) and not sources.labels(role):
            names[role] = sources.from_store(role)
        elif role in ("test", "sup_peak"):
            names[role] = store.write(ds.without_labels(), f"{ds.name}_unlabelled").name
        else:
            names[role] = store.write(ds, ds.name).name
        hashes[f"{role}_hash"] = store.manifest(names[role]).content_hash
    return DataSpec(store=store.root.uri, **names, **hashes).to_dict()
