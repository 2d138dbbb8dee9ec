"""Without a GPU the Triton kernels run in triton's interpreter on CPU tensors. The switch is
read when a kernel is decorated, so it must be set before ``bnrewrite.runtime.kernels._triton``
is imported: collection of this folder happens before any test imports it."""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
