import os
import warnings

import pytest
import torch

# Without a GPU the Triton kernels run in triton's interpreter on CPU tensors. Triton reads the
# switch when a kernel is decorated, so it is set here, before any test module imports bnrewrite.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

# CI has 2 cores and runs 2 xdist workers: one thread each avoids oversubscription.
torch.set_num_threads(int(os.environ.get("BNREWRITE_TEST_THREADS", "1")))
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_same_structure_equal(a, b, path="output"):
    """Bitwise equality of two model outputs of any structure (tensor, tuple, dict, namedtuple)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b).__name__}"
        assert a.shape == b.shape, f"{path}: shape {a.shape} vs {b.shape}"
        assert torch.equal(a, b), f"{path}: max abs diff {(a - b).abs().max().item()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys differ"
        for k in a:
            assert_same_structure_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) or (isinstance(b, (tuple, list)) and len(a) == len(b)), \
            f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_structure_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"
