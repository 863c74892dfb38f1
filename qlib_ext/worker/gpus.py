"""Which GPU each worker process gets: ``workers.gpus`` / ``--gpus 0,1,2,3`` (or ``all``) and ``--workers-per-gpu``.

A worker given a device sees only that one (``CUDA_VISIBLE_DEVICES`` set before anything imports torch), so a
task's ``GPU: 0`` means "my device". Devices are handed out in order, ``workers_per_gpu`` workers per device
(default one); asking for more workers than that is a ``ConfigError`` naming both fixes. Without ``gpus`` nothing
changes: workers see what the parent sees.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from typing import Any

from qlib_ext.errors import ConfigError

logger = logging.getLogger(__name__)

VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
"""The variable CUDA (and so torch) reads at initialisation to decide which devices a process sees."""

DEVICE_ORDER = "CUDA_DEVICE_ORDER"
"""Set to PCI_BUS_ID in a worker with a device, so that CUDA numbers devices as nvidia-smi does (its default is
fastest first)."""

ALL = "all"
"""``gpus`` value meaning every device of this host."""


def parse(value: Any, where: str = "--gpus") -> tuple[str, ...]:
    """Device ids from ``"0,1,2,3"``, ``[0, 1]``, ``"all"`` or None/"" (no GPUs: ``()``).

    Raises:
        ConfigError: not a list of non-negative integers or ``all`` (the message names ``where``), or ``all``
            on a host where no device is found.
    """
    if value is None or value == "" or value == ():
        return ()
    if isinstance(value, str) and value.strip().lower() == ALL:
        found = detect()
        if not found:
            raise ConfigError(f"{where}: 'all' but no GPU found on this host (nvidia-smi -L lists none and "
                              f"{VISIBLE_DEVICES} is unset); give device ids, e.g. 0,1, or leave gpus out")
        return found
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    ids = [str(i).strip() for i in items] if items is not None else None
    if not ids or not all(re.fullmatch(r"\d+", i) for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError(f"{where}: got {value!r}; expected distinct device ids such as 0,1,2,3, or 'all'")
    return tuple(ids)


def detect() -> tuple[str, ...]:
    """This host's device ids: ``CUDA_VISIBLE_DEVICES`` if set, else the GPUs ``nvidia-smi -L`` lists."""
    visible = os.environ.get(VISIBLE_DEVICES)
    if visible is not None:
        return tuple(d.strip() for d in visible.split(",") if d.strip())
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("gpus: nvidia-smi -L failed (%s); no GPU found", e)
        return ()
    return tuple(m.group(1) for m in re.finditer(r"^GPU (\d+):", out, re.M))


def slots(gpus: tuple[str, ...], workers_per_gpu: int, n: int) -> list[str | None]:
    """The device of each of ``n`` workers (None: no GPU, when ``gpus`` is empty).

    Raises:
        ConfigError: more workers than ``len(gpus) * workers_per_gpu``.
    """
    if not gpus:
        return [None] * n
    room = len(gpus) * workers_per_gpu
    if n > room:
        raise ConfigError(f"{n} workers but gpus {','.join(gpus)} x workers_per_gpu {workers_per_gpu} give "
                          f"{room} places; pass -n {room} or fewer, or --workers-per-gpu "
                          f"{-(-n // len(gpus))} (several workers share a device)")
    return [gpus[i // workers_per_gpu] for i in range(n)]


def default_workers(gpus: tuple[str, ...], workers_per_gpu: int) -> int | None:
    """Workers to start when ``-n`` is not given: one per place on the devices (None without GPUs)."""
    return len(gpus) * workers_per_gpu if gpus else None


def isolate(device: str | None, gpus: tuple[str, ...]) -> None:
    """In a worker process, before torch is imported: see only ``device`` (or no GPU when the group has GPUs but
    this worker none; without GPUs, leave the environment alone). Ids are nvidia-smi's (PCI bus order)."""
    if device is not None or gpus:
        os.environ.setdefault(DEVICE_ORDER, "PCI_BUS_ID")
        os.environ[VISIBLE_DEVICES] = device or ""


def label(device: str | None, gpus: tuple[str, ...]) -> str | None:
    """What status and the MLflow tag call a worker's device: ``cuda:2`` (the host's id), ``cpu``, or None
    when the worker was started without GPUs (it sees what its parent saw)."""
    if device is not None:
        return f"cuda:{device}"
    return "cpu" if gpus else None
