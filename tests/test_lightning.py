"""The optional Lightning callback: a clear ImportError without Lightning, a redraw per epoch with it."""
import importlib.util

import pytest
import torch

import bnrewrite

HAVE_LIGHTNING = any(importlib.util.find_spec(m) is not None for m in ("lightning", "pytorch_lightning"))


@pytest.mark.skipif(HAVE_LIGHTNING, reason="checks the message shown when Lightning is missing")
def test_clear_import_error_without_lightning():
    with pytest.raises(ImportError, match="pip install lightning"):
        import bnrewrite.lightning  # noqa: F401


@pytest.mark.skipif(not HAVE_LIGHTNING, reason="Lightning is an optional dependency")
def test_callback_redraws_each_epoch():
    from bnrewrite.lightning import NewEpochCallback
    from bnrewrite.runtime.sampled import SampledBatchNorm

    model = bnrewrite.transform(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)), "fs")
    norm = next(m for m in model.modules() if isinstance(m, SampledBatchNorm))
    before = norm.sample_spec((4, 4, 30, 30))
    NewEpochCallback().on_train_epoch_start(None, model)
    assert norm.sample_spec((4, 4, 30, 30)) != before
