"""Second-stage models over each series' slices: padded sequences, nets, the neighbours baseline, fold-wise fitting.

`ich_kaggle.stack` is the public entry point (files in, files out); this package holds the pure array code.
"""
