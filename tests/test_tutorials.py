"""Execute every tutorial notebook (tutorials/*.ipynb) top to bottom, twice: on the built-in toy (the figures and the
checks each notebook makes of its own claims), and with MINIVD_WEIGHTS pointing at a tiny random checkpoint in the
official layout, so the path a reader with the real weights takes cannot rot. A cell that raises fails the test.

The notebooks run two at a time, each in a fresh "python3" kernel of this interpreter (minivd.tools.notebooks).
"""

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

from minivd.tools.notebooks import TUTORIALS, execute, notebooks

NOTEBOOKS = notebooks()


def test_tutorials_exist():
    assert len(NOTEBOOKS) >= 10, f"expected the ten tutorials in {TUTORIALS}"


def test_kernel_spec_available():
    """The python3 kernel is ipykernel's: installed in the venv or, failing that, the one jupyter_client finds inside
    the ipykernel package. Its command 'python' is run as sys.executable, so the kernel sees this interpreter's packages."""
    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        pytest.fail(f"no python3 kernel: install ipykernel (pip install ipykernel) or run "
                    f"`{sys.executable} -m ipykernel install --sys-prefix`")
    assert "ipykernel" in " ".join(spec.argv), f"the python3 kernel is not ipykernel: {spec.argv}"


@pytest.fixture(scope="module")
def runs(tiny_vd):
    """{(notebook name, "toy" | "weights"): (seconds, error or None)} for every notebook on both models."""
    jobs = [(path, mode) for mode in ("toy", "weights") for path in NOTEBOOKS]

    def run(job):
        path, mode = job
        _, seconds, error = execute(path, weights=tiny_vd if mode == "weights" else None)
        return (path.name, mode), (seconds, error)

    start = time.time()
    with ThreadPoolExecutor(2) as pool:
        results = dict(pool.map(run, jobs))
    print(f"\n{len(jobs)} notebook runs in {time.time() - start:.0f} s: " +
          ", ".join(f"{name} {mode} {s:.0f}s" for (name, mode), (s, _) in results.items()))
    return results


@pytest.mark.parametrize("mode", ["toy", "weights"])
@pytest.mark.parametrize("name", [p.name for p in NOTEBOOKS])
def test_notebook_runs(runs, name, mode):
    seconds, error = runs[(name, mode)]
    if error is not None:
        pytest.fail(f"{name} ({mode}): a cell raised\n{error}", pytrace=False)
