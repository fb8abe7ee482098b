"""A-FINE: Adaptive FIdelity-Naturalness Evaluator (CVPR 2025), in plain PyTorch. Lower scores are better."""

import importlib

from .errors import AfineError

__version__ = "0.1.0"  # the one place it is written (pyproject.toml reads it)

__all__ = ["AFINE", "AFINELoss", "AfineError", "TERMS", "load_afine", "load_image"]
# AFINEMetric needs the optional torchmetrics, so it is not in __all__ (`from afine import *` works without it)
_FROM = {"AFINE": "model", "AFINELoss": "afine_loss", "AFINEMetric": "metric", "TERMS": "model", "load_afine": "model",
         "load_image": "image"}


def __getattr__(name: str):
    """The model, the loss, the torchmetrics metric and the image loader, imported on first use: `import afine`
    alone does not load torch (so a command, `python -m afine ...`, handles a Ctrl-C that arrives while torch loads:
    afine/interrupts.py) nor the optional torchmetrics."""
    if name not in _FROM:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(f"{__name__}.{_FROM[name]}"), name)
    return value
