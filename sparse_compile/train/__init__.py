"""Sparse training: the trainer (SRigL, RigL, static), per-layer budgets, layer discovery, data."""
