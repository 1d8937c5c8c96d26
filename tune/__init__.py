"""Ray Tune / Ray Train sweeps around xfer's one training loop.

Ray is imported lazily (inside functions), so `import tune` is cheap and the search space can
be validated without starting Ray. A sweep from Python: `tune.sweep(...)` (tune/api.py).
"""

__all__ = ["sweep", "SweepResult"]


def __getattr__(name: str):
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'tune' has no attribute {name!r}")
