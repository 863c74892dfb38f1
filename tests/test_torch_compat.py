"""Qlib 0.9.7's MLP (``DNNModelPytorch``) on the torch the ``torch`` extra installs (issue 23 §5): Qlib passes
``ReduceLROnPlateau(verbose=...)`` on torch >= 2.10 (it compares version strings), which torch no longer takes."""

from __future__ import annotations

import inspect

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install -e '.[torch]'): nothing to check")


@pytest.fixture
def scheduler_restored(monkeypatch):
    """The patch is process-wide: put torch's own class back after the test."""
    from torch.optim import lr_scheduler

    monkeypatch.setattr(lr_scheduler, "ReduceLROnPlateau", lr_scheduler.ReduceLROnPlateau)


def test_qlibs_mlp_builds_and_steps_its_scheduler_on_this_torch(scheduler_restored):
    from qlib.contrib.model.pytorch_nn import DNNModelPytorch
    from torch.optim import lr_scheduler

    from qlib_ext.worker import torch_compat

    config = {"class": "DNNModelPytorch", "module_path": "qlib.contrib.model.pytorch_nn",
              "kwargs": {"pt_model_kwargs": {"input_dim": 4, "layers": (8,)}, "GPU": -1}}
    takes_verbose = "verbose" in inspect.signature(lr_scheduler.ReduceLROnPlateau.__init__).parameters
    qlib_passes_verbose = torch.__version__.split("+")[0] <= "2.6.0"  # Qlib's own (string) comparison
    if qlib_passes_verbose and not takes_verbose:  # the broken pair: Qlib alone cannot build its MLP
        with pytest.raises(TypeError, match="verbose"):
            DNNModelPytorch(**config["kwargs"])
    torch_compat.prepare(config)
    model = DNNModelPytorch(**config["kwargs"])
    model.scheduler.step(1.0)
    assert isinstance(model.scheduler, torch.optim.lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau)
    torch_compat.prepare({"class": "LGBModel", "module_path": "qlib.contrib.model.gbdt"})  # not torch: untouched
