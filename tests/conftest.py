"""Test-wide setup: Triton runs in its CPU interpreter when no GPU is present.

TRITON_INTERPRET must be set before triton is first imported, so it is set here, at collection.
"""
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
sys.path.insert(0, os.path.dirname(__file__))  # tests/oracle.py


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
