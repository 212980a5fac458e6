"""A training worker's slowest import, started while the worker would otherwise wait.

A worker's first optimizer imports ``torch._dynamo`` (torch's optimizers do, on their first
``zero_grad`` or ``step``), and that imports sympy: on the H200 machine, in a fresh process with
everything byte-compiled, ``import torch._dynamo`` took 3.1-4.1 s of which sympy 2.3 s (0.4 s on
the 2-core machine), all of it inside the ``model`` phase of :mod:`~lepton_ray.train.timeline`.
Meanwhile, between its actor's start and the training function's, the worker mostly waits for
Ray Train's controller (the process group, the datasets' coordinator, the launch).

:class:`lepton_ray.train.backend.TorchBackendConfig`'s backend, as the worker group starts, asks
each worker (without waiting for the answer) to run :func:`warm_imports`: sympy imported on a
thread of its own, while the process group is set up. When the optimizer's import reaches
sympy it finds it imported, or waits for the thread's import to finish (Python's per-module
import lock) rather than doing it again. A worker started through lepton_ray's set-up hook
(:mod:`lepton_ray.train.prestart`) has imported ``torch._dynamo``, sympy with it, before its
actor started; the thread is for the others (a job with a set-up hook of its own).

Why sympy and nothing else: it imports only itself, mpmath and the standard library, and nothing
the worker's main thread imports imports it except through ``torch._dynamo``. Two threads
importing modules that import each other can see a module half initialised; torch's own modules
do import each other, so they stay on the main thread.
"""

from __future__ import annotations

import importlib
import threading

WARM_MODULES = ("sympy",)


def warm_imports(modules: tuple[str, ...] = WARM_MODULES) -> None:
    """Import ``modules`` on a daemon thread and return at once; a failure there is left for the
    main thread's own import to meet and report."""

    def run() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - the main thread's import raises it where it matters
                return

    threading.Thread(target=run, name="lepton-warm-imports", daemon=True).start()
