"""Layer 0: what every stage shares (config schema, registries, errors, atomic io, the run layout, labels, the metric).

Imports nothing else of the package and no torch, so scoring and validating stay fast anywhere (the kernel too).
"""
