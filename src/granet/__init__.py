"""granet: sparse training during training for PyTorch.

GraNet and the methods it is measured against (GMP, RigL, SET, SNFS, static ERK).
"""

from granet.algorithm import Algorithm
from granet.distributions import DISTRIBUTIONS
from granet.export import load_sparse, save_sparse
from granet.inference import sparse_inference
from granet.methods import GMP, METHODS, SET, SNFS, GraNet, RigL, Static, sparsify
from granet.sparsifier import Sparsifier

__all__ = [
    "Algorithm",
    "DISTRIBUTIONS",
    "GMP",
    "METHODS",
    "SET",
    "SNFS",
    "GraNet",
    "RigL",
    "Sparsifier",
    "Static",
    "load_sparse",
    "save_sparse",
    "sparse_inference",
    "sparsify",
]
__version__ = "0.1.0"
