"""How the code is put together: the package's imports form a tree (no cycle, not even inside functions), the
weights loader imports nothing from the package at module level and runs once as a script, and the tests never
import the benchmark."""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "minivd"


def module_name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path, module_level_only=False):
    """The minivd modules `path` imports (absolute or relative), anywhere in the file or only at module level."""
    tree = ast.parse(path.read_text(), str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "minivd"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from .x import y / from . import x
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "minivd":
                continue
            for alias in node.names:  # "from . import speed" names a module; "from .x import f" names x
                candidate = f"{target}.{alias.name}"
                found.add(candidate if (ROOT / (candidate.replace(".", "/") + ".py")).exists() else target)
    return {m for m in found if m != name}


def graph():
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p): p for p in files}
    edges = {}
    for name, path in modules.items():
        # importing minivd.x.y also runs minivd.x/__init__.py and minivd/__init__.py; only the named module counts
        edges[name] = {m for m in imports(path) if m in modules}
    return edges


def find_cycle(edges):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_package_imports_form_a_tree():
    edges = graph()
    edges.pop("minivd", None)  # the package's __init__ re-exports: it imports everything and nothing imports it
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    # the networks import only building blocks: no loading, pipeline or tools
    for network in ("minivd.unet", "minivd.attention", "minivd.resnet", "minivd.ddim", "minivd.clip", "minivd.vae",
                    "minivd.optimus", "minivd.tokenizer"):
        assert not edges[network] & {"minivd.checkpoint", "minivd.model", "minivd.pipeline", "minivd.speed"}, network
        assert not any(m.startswith("minivd.tools") for m in edges[network]), network


def test_the_cycle_finder_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_weights_loader_imports_nothing_from_the_package_at_module_level():
    assert imports(ROOT / "weights_loader.py", module_level_only=True) == set()


def test_weights_loader_runs_once_as_a_script(tiny_vd):
    """`python weights_loader.py check` loads the package, which imports `weights_loader`: that must be the running
    script itself, not a second execution of the file."""
    done = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "weights_loader.py"), "check", tiny_vd],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "minivd.checkpoint" in imported  # the probe sees imports
    assert "weights_loader" not in imported


def test_the_tests_do_not_import_the_benchmark():
    for path in sorted((ROOT / "tests").glob("*.py")):
        found = imports(path)
        assert "minivd.tools.bench" not in found, path.name


def test_files_stay_readable_in_size():
    """STYLE: one concept per file, about 100-400 lines; the dual-context UNet may be the one longer file."""
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    too_long = {name: n for name, n in sizes.items() if n > 450 and not name.startswith("minivd/tools/")}
    assert not too_long, too_long


def test_the_readme_debugger_stops_are_where_it_says():
    """README's "Stepping through" names file:line stops and the code on them; an edit that moves the line must move
    the README too."""
    readme = open(os.path.join(ROOT, "README.md")).read()
    stops = {"minivd/ddim.py:141": "eps_uncond, eps_cond = denoiser(x_t, t)", "minivd/unet.py:283": "layers = self.data[data]"}
    for stop, code in stops.items():
        assert f"b {stop}" in readme, stop
        path, line = stop.split(":")
        assert open(os.path.join(ROOT, path)).read().splitlines()[int(line) - 1].strip() == code, stop
