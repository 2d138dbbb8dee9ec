"""Every runtime module in one place (each is defined next to its reference functional)."""
from .base import BatchNormState
from .batch_group import BatchGroupNorm, GroupExampleWeightedNorm
from .cross_iteration import CrossIterationBatchNorm
from .extreme import ExtremeNorm, RotatedExtremeNorm
from .ghost import GhostBatchNorm
from .sampled import SampledBatchNorm, VirtualRowsInput, VirtualRowsOutput

__all__ = ["BatchNormState", "BatchGroupNorm", "GroupExampleWeightedNorm", "CrossIterationBatchNorm",
           "ExtremeNorm", "RotatedExtremeNorm", "GhostBatchNorm", "SampledBatchNorm", "VirtualRowsInput",
           "VirtualRowsOutput"]
