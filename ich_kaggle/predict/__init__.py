"""Predict stage: TTA inference of every trained fold on test and out-of-fold images, fold averaging."""

from .stage import predict

__all__ = ["predict"]
