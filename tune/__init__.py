"""Ray Tune / Ray Train sweeps around xfer's one training loop.

Ray is imported lazily (inside functions), so `import tune` is cheap and the
search space can be validated without starting Ray.
"""
