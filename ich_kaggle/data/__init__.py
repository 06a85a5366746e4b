"""Data layer: DICOM -> Hounsfield units -> windows, metadata, labels, folds, cache, synthetic competition."""
