"""A-FINE: Adaptive FIdelity-Naturalness Evaluator (CVPR 2025), in plain PyTorch. Lower scores are better."""

from .errors import AfineError
from .image import load_image
from .model import AFINE, TERMS, load_afine

__all__ = ["AFINE", "AfineError", "TERMS", "load_afine", "load_image"]
