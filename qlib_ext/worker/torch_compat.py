"""Qlib 0.9.7's PyTorch models on the torch releases it misreads.

``qlib.contrib.model.pytorch_nn.DNNModelPytorch`` (Qlib's MLP benchmark) picks its ``ReduceLROnPlateau`` call by
comparing version *strings*: ``"2.13.0" <= "2.6.0"`` is true, so on torch 2.10 and later it passes ``verbose=``,
which torch removed in 2.7, and the model cannot be built (``TypeError: ... unexpected keyword argument
'verbose'``). On such a torch, :func:`accept_verbose` makes ``ReduceLROnPlateau`` take and ignore ``verbose`` (it
only printed learning-rate changes), which is the call Qlib makes on torch 2.7-2.9. Nothing else changes; torch
itself is imported only when a task's model is one of Qlib's PyTorch models.
"""

from __future__ import annotations

import inspect
import logging

logger = logging.getLogger(__name__)

PYTORCH_MODULES = "qlib.contrib.model.pytorch"
"""Module prefix of Qlib's PyTorch models (``pytorch_nn``, ``pytorch_gru_ts``, ...)."""


def prepare(model_config: object) -> None:
    """Apply :func:`accept_verbose` when the task's model is one of Qlib's PyTorch models."""
    module = model_config.get("module_path") if isinstance(model_config, dict) else None
    if isinstance(module, str) and module.startswith(PYTORCH_MODULES):
        accept_verbose()


def accept_verbose() -> bool:
    """Make ``torch.optim.lr_scheduler.ReduceLROnPlateau`` accept (and ignore) ``verbose``; True if it had to."""
    from torch.optim import lr_scheduler

    cls = lr_scheduler.ReduceLROnPlateau
    if "verbose" in inspect.signature(cls.__init__).parameters or getattr(cls, "_qlib_ext_verbose", False):
        return False

    class ReduceLROnPlateau(cls):  # type: ignore[valid-type,misc]
        _qlib_ext_verbose = True

        def __init__(self, *args: object, verbose: object = None, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)

    ReduceLROnPlateau.__qualname__ = ReduceLROnPlateau.__name__ = cls.__name__
    ReduceLROnPlateau.__module__ = cls.__module__
    lr_scheduler.ReduceLROnPlateau = ReduceLROnPlateau  # type: ignore[misc]
    logger.info("torch %s: ReduceLROnPlateau takes and ignores verbose= for Qlib 0.9.7's pytorch_nn",
                _version())
    return True


def _version() -> str:
    import torch

    return str(torch.__version__)
