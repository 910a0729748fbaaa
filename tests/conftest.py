import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # weights_loader.py, tests/

from tiny_vd import build_tiny_vd  # noqa: E402

# The tests run tiny models: one thread is faster than two there, and much faster when the machine is busy
# (subprocesses the tests start set OMP_NUM_THREADS=1 or their own count).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_vd(tmp_path_factory):
    """A tiny random VD folder in the official layout, safetensors files."""
    return build_tiny_vd(str(tmp_path_factory.mktemp("tiny_vd_safetensors")), fmt="safetensors")


@pytest.fixture(scope="session")
def tiny_vd_bin(tmp_path_factory):
    """The same layout as pickled .bin files, with the old VAE attention names (like the official upload)."""
    return build_tiny_vd(str(tmp_path_factory.mktemp("tiny_vd_bin")), fmt="bin", legacy_vae=True, seed=1)
