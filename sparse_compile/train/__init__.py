"""Sparse training: the trainer and its update rules (SRigL, RigL, static), per-layer budgets,
layer discovery, the report, data sets and the training loop."""
from .methods import RigL, SRigL, StaticSparse
from .report import MaskStats, SparsityReport
from .trainer import SparseTrainer

__all__ = ["SRigL", "RigL", "StaticSparse", "SparseTrainer", "SparsityReport", "MaskStats"]
