"""A tiny PyTorch Lightning callback (optional: only when Lightning is installed).

Example::

    from bnrewrite.lightning import NewEpochCallback
    trainer = lightning.Trainer(callbacks=[NewEpochCallback()])
"""
from __future__ import annotations

try:
    import lightning.pytorch as _pl
except ImportError:  # the older package name
    try:
        import pytorch_lightning as _pl
    except ImportError as exc:
        raise ImportError("bnrewrite.lightning needs PyTorch Lightning: pip install lightning "
                          "(or call bnrewrite.new_epoch(model) at the start of each epoch yourself)") from exc

from .schedule import new_epoch


class NewEpochCallback(_pl.Callback):
    """Re-draws the sampling indices of the LightningModule's rewritten BatchNorms at the start of
    every training epoch (the papers redraw once an epoch), like calling ``bnrewrite.new_epoch``."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        new_epoch(pl_module)
