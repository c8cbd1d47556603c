"""granet: sparse training during training for PyTorch.

GraNet and the methods it is measured against (GMP, RigL, SET, SNFS, static ERK).
"""

from granet.distributions import DISTRIBUTIONS
from granet.methods import GMP, METHODS, SET, SNFS, GraNet, RigL, Static, sparsify
from granet.sparsifier import Sparsifier

__all__ = [
    "DISTRIBUTIONS",
    "GMP",
    "METHODS",
    "SET",
    "SNFS",
    "GraNet",
    "RigL",
    "Sparsifier",
    "Static",
    "sparsify",
]
__version__ = "0.1.0"
