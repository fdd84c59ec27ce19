"""Flow Lune: a rectified-flow student distilled from an epsilon-prediction SD1.5 teacher.

The subpackages live at the repository's top level (``schedulers/``, ``pipelines/``,
``convert/``, ``training/``) and are installed as ``flow_lune.<name>`` (see ``setup.py``).
The main classes are re-exported here lazily, so ``import flow_lune`` stays cheap.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "FlowLuneScheduler": "flow_lune.schedulers",
    "FlowLunePipeline": "flow_lune.pipelines",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flow_lune' has no attribute {name!r}")
