import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # weights_loader.py, tests/

from tiny_vd import build_tiny_vd  # noqa: E402


@pytest.fixture(scope="session")
def tiny_vd(tmp_path_factory):
    """A tiny random VD folder in the official layout, safetensors files."""
    return build_tiny_vd(str(tmp_path_factory.mktemp("tiny_vd_safetensors")), fmt="safetensors")


@pytest.fixture(scope="session")
def tiny_vd_bin(tmp_path_factory):
    """The same layout as pickled .bin files, with the old VAE attention names (like the official upload)."""
    return build_tiny_vd(str(tmp_path_factory.mktemp("tiny_vd_bin")), fmt="bin", legacy_vae=True, seed=1)
