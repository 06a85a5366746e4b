"""Kaggle: the code and model datasets, the offline kernel (build and in-kernel run), wheels, kaggle CLI calls."""
