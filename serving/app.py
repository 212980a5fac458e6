"""The Serve application for ``serve run`` / ``serve deploy``.

    serve run serving/config.yaml                       # edit args.checkpoint first, or:
    serve run serving.app:app checkpoint=/path/to/checkpoint_epoch0015_step0000600 max_replicas=4

The builder takes the fields of :class:`lepton_ray.config.ServeConfig` as its arguments.
"""

import typing
from typing import Any

from lepton_ray.config import ServeConfig, parse_override
from lepton_ray.serve import build_app


def app(args: dict[str, Any]) -> Any:
    """Application builder: Serve passes the YAML ``args``, or ``key=value`` pairs from the
    ``serve run`` command line as strings; a string given for a field that is not text is read
    as YAML (``max_replicas=4``, ``use_gpu=true``), as ``--set`` reads it."""
    hints = typing.get_type_hints(ServeConfig)
    parsed = {}
    for key, value in dict(args).items():
        if isinstance(value, str) and hints.get(key) not in (str, str | None):
            value = parse_override(f"{key}={value}")[1]
        parsed[key] = value
    return build_app(parsed)
