"""Execute every tutorial notebook (tutorials/*.ipynb) top to bottom; a cell that raises fails the test.

Each notebook runs in a fresh "python3" kernel started with this interpreter, in tutorials/, on the built-in tiny demo
model: MINIVD_WEIGHTS is removed from the kernel's environment so CI never reads real weights.
"""

import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
KERNEL = "python3"
CELL_TIMEOUT_S = 600
ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


def kernel_env():
    """The kernel's environment: ours, without MINIVD_WEIGHTS, with the repo root importable, a headless matplotlib
    and one thread."""
    env = {k: v for k, v in os.environ.items() if k != "MINIVD_WEIGHTS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["MPLBACKEND"] = "Agg"
    env["OMP_NUM_THREADS"] = "1"  # the tiny model's ops are too small to share between threads
    return env


def test_tutorials_exist():
    assert NOTEBOOKS, f"no notebooks found in {TUTORIALS}"


def test_kernel_spec_available():
    """The python3 kernel is ipykernel's: installed in the venv or, failing that, the one jupyter_client finds inside
    the ipykernel package. Its command 'python' is run as sys.executable, so the kernel sees this interpreter's packages."""
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        pytest.fail(f"no {KERNEL!r} kernel: install ipykernel (pip install ipykernel) or run "
                    f"`{sys.executable} -m ipykernel install --sys-prefix`")
    assert "ipykernel" in " ".join(spec.argv), f"the {KERNEL!r} kernel is not ipykernel: {spec.argv}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(TUTORIALS)}})  # cwd = tutorials/
    error = None
    try:
        client.execute(env=kernel_env())
    except CellExecutionError as e:  # its message holds the failing cell's source and traceback
        error = ANSI_COLOR.sub("", str(e))
    if error is not None:
        pytest.fail(f"{path.name}: a cell raised\n{error}", pytrace=False)
