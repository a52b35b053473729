"""Shared test set-up.

Triton kernels run on CPU through the interpreter when there is no GPU; the variable must be set
before anything imports triton, which is why it happens here, first.
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Shared test helpers (sparse_models.py) import by name from this folder under --import-mode=importlib.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
