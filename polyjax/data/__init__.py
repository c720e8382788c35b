"""The input pipeline: sources, tokenizers, token stores, packing and the Grain stream."""

from polyjax.data.checks import Checked, validate
from polyjax.data.config import DataConfig, check_context
from polyjax.data.pipeline import Pipeline, TrainIterator, make_pipeline

__all__ = [
    "Checked",
    "DataConfig",
    "Pipeline",
    "TrainIterator",
    "check_context",
    "make_pipeline",
    "validate",
]
