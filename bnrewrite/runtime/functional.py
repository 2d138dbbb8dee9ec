"""Plain-torch reference implementations (CPU and CUDA) of the runtime ops; fused kernels must match these."""
from .cross_iteration import compensate_statistics, mean_gradient, sq_mean_gradient, window_statistics
from .extreme import hadamard_matrix, random_rotation, scale_grad
from .sampled import mix_statistics, normalize_with, sampled_batch_norm_reference, sampled_statistics

__all__ = ["compensate_statistics", "mean_gradient", "sq_mean_gradient", "window_statistics", "hadamard_matrix",
           "random_rotation", "scale_grad", "mix_statistics", "normalize_with", "sampled_batch_norm_reference",
           "sampled_statistics"]
