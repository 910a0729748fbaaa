"""Execute the tutorials: `python -m minivd.tools.notebooks` runs every notebook in tutorials/ top to bottom on the
built-in toy and saves it with its outputs (the figures a reader sees on the repository page).

    python -m minivd.tools.notebooks                      # every notebook, outputs written back
    python -m minivd.tools.notebooks 04_text_to_image     # the notebooks whose names contain the words
    python -m minivd.tools.notebooks --check              # run them, write nothing (what the tests do)
    MINIVD_WEIGHTS=path python -m minivd.tools.notebooks --check   # on other weights

Each notebook runs in a fresh "python3" kernel (ipykernel) started from this interpreter, in tutorials/, with the
repository on PYTHONPATH, an inline (headless) matplotlib and one thread per kernel; two notebooks run at a time. Needs the
test extra: nbclient, nbformat, ipykernel, matplotlib (pip install -e ".[test]").
"""

import argparse
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TUTORIALS = ROOT / "tutorials"
ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")  # IPython colours its tracebacks


def kernel_env(weights=None):
    """The kernel's environment: ours, MINIVD_WEIGHTS set to `weights` (None: removed, so the built-in toy runs), the
    repository importable, a headless matplotlib and one thread."""
    env = {k: v for k, v in os.environ.items() if k != "MINIVD_WEIGHTS"}
    if weights:
        env["MINIVD_WEIGHTS"] = str(weights)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"  # headless, and plt.show() leaves the figure in the cell
    env["OMP_NUM_THREADS"] = "1"  # the toy's ops are too small to share between threads
    env["PYTHONWARNINGS"] = "ignore"  # the built-in model says what it is in the notebook itself
    return env


def execute(path, weights=None, timeout=600):
    """Run one notebook; returns (the executed notebook, seconds, None or the failing cell's error text)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=timeout, resources={"metadata": {"path": str(TUTORIALS)}})
    start, error = time.time(), None
    try:
        client.execute(env=kernel_env(weights))
    except CellExecutionError as e:  # its message holds the failing cell's source and traceback
        error = ANSI_COLOR.sub("", str(e))
    return nb, time.time() - start, error


def notebooks(words=()):
    found = sorted(TUTORIALS.glob("*.ipynb"))
    return [p for p in found if all(w in p.name for w in words)]


def main(argv=None):
    import nbformat

    p = argparse.ArgumentParser(prog="python -m minivd.tools.notebooks", description=__doc__.split("\n\n")[0])
    p.add_argument("words", nargs="*", help="run only the notebooks whose names contain these")
    p.add_argument("--check", action="store_true", help="run, but do not write the outputs back")
    p.add_argument("--jobs", type=int, default=2, help="notebooks run at a time (2)")
    args = p.parse_args(argv)
    paths = notebooks(args.words)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda path: (path, *execute(path, os.environ.get("MINIVD_WEIGHTS"))), paths))
    failed = 0
    for path, nb, seconds, error in results:
        print(f"{path.name}: {'FAILED' if error else 'ok'} in {seconds:.1f} s")
        if error:
            failed += 1
            print(error[-3000:])
        elif not args.check:
            for cell in nb.cells:  # execution counts and kernel ids would make every run a diff
                cell.get("metadata", {}).pop("execution", None)
            nbformat.write(nb, path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
