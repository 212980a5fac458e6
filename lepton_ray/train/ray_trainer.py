"""Ray Train's trainer for a ``fit()``, less the process a fit without a Ray Dataset never uses.

Ray Train gives every worker group a ``DatasetsCallback``, which starts a ``DatasetManager`` actor
(a process of its own) to split the Ray Datasets passed as ``datasets=`` between the workers.
Most fits pass none: a prepared dataset is read by each worker's feed from its manifest
(:mod:`lepton_ray.train.feed`). The actor started anyway, and on the 2-core machine its process
took 1.8-2.4 s of CPU per fit (two samplings of the test suite's processes) importing Ray Train
and Ray Data, beside the fit's own start.

:class:`FitTrainer` is Ray Train's ``DataParallelTrainer`` with lepton_ray's torch backend
(:class:`lepton_ray.train.backend.TorchBackendConfig`, passed by the caller). Where ``datasets``
is empty it swaps that callback for :class:`DataContextCallback`, which keeps the other half of
its work: the driver's Ray Data settings (``DataContext``), captured when the fit starts, become
each worker's, so the feeds' reads run with what the user set on the driver. A fit given a Ray
Dataset (a user's, or the validation set) keeps Ray Train's callback unchanged.

The callback is unpickled in Ray Train's controller, so this module imports neither torch nor
``ray.train.torch`` (whose ``TorchTrainer`` would import torch there). Ray Train's callback lives
in a private module: where a Ray release moves it, :data:`DatasetsCallback` is ``None`` and every
fit keeps Ray Train's callbacks as they are.
"""

from __future__ import annotations

import copy
from typing import Any

from ray.data import DataContext
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

try:  # private to Ray Train (2.60): without it, fits keep Ray Train's callbacks
    from ray.train.v2._internal.callbacks import DatasetsCallback
except ImportError:  # pragma: no cover - a Ray release that moved it
    DatasetsCallback = None


class DataContextCallback(WorkerGroupCallback):
    """The driver's ``DataContext`` (as when the fit started) on every worker of each group, as
    Ray Train's ``DatasetsCallback`` propagates it, without its dataset manager."""

    def __init__(self) -> None:
        self._data_context = copy.deepcopy(DataContext.get_current())

    def after_worker_group_start(self, worker_group: Any) -> None:
        # Pickled by reference to ray.data.context: a function of this module would make each
        # worker import it, and with it Ray Train's trainer API (0.17 CPU-s on 2 cores).
        worker_group.execute(DataContext._set_current, self._data_context)


class FitTrainer(DataParallelTrainer):
    """Ray Train's ``DataParallelTrainer`` starting no dataset manager when given no dataset."""

    def _create_default_callbacks(self) -> list[Any]:
        callbacks = super()._create_default_callbacks()
        if self.datasets or DatasetsCallback is None:
            return callbacks
        return [
            DataContextCallback() if isinstance(cb, DatasetsCallback) else cb for cb in callbacks
        ]
