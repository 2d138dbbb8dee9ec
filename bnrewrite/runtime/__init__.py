"""What rewritten graphs call at run time: one module per variant (``modules``) and plain-torch
reference implementations (``functional``); fused Triton kernels live in ``kernels``."""
