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


@pytest.fixture
def one_process_group():
    """For a test that runs a one-process FSDP2 trainer in the pytest process: the process group
    is destroyed and the environment Lightning set for it (``MASTER_PORT`` and the ranks) is
    restored afterwards, so that later tests' processes pick their own port."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group of another test is still initialised")
    saved = dict(os.environ)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)
