"""The Serve application for ``serve run`` / ``serve deploy``.

    serve run serving/config.yaml                       # edit args.checkpoint first, or:
    serve run serving.app:app checkpoint=/path/to/checkpoint_epoch0015_step0000600

The builder takes the fields of :class:`lepton_ray.serve.ServeConfig` as its arguments.
"""

from typing import Any

from lepton_ray.serve import build_app


def app(args: dict[str, Any]) -> Any:
    """Application builder: Serve passes the YAML ``args`` (or ``key=value`` CLI pairs) here."""
    return build_app(dict(args))
