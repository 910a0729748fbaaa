"""The command line: every flow reachable, the demo warning, real weights via --weights, clear errors."""

import os
import subprocess
import sys

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "MINIVD_WEIGHTS"}  # the built-in model unless --weights
    size = [] if args[0] in ("image-to-text", "text-variation") else ["--height", "64", "--width", "64"]
    return subprocess.run([sys.executable, "-m", "minivd", *args, "--steps", "2", *size],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_the_toy_runs_without_weights_and_says_so(tmp_path):
    out = tmp_path / "circle.png"
    result = run("text-to-image", "a small red circle on the left", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "TOY model" in result.stderr and "denoising" in result.stderr  # it says what it runs
    assert Image.open(out).size == (64, 64)


@pytest.mark.parametrize("mode", ["image-variation", "dual-guided", "multi-context", "image-to-text", "text-variation", "edit"])
def test_every_mode_is_reachable(tiny_vd, tmp_path, mode):
    picture = tmp_path / "in.png"
    Image.new("RGB", (50, 40), (200, 30, 30)).save(picture)
    args = {"image-variation": ["--image", str(picture)], "dual-guided": ["a fox", "--image", str(picture)],
            "multi-context": ["--image", str(picture), "--image", str(picture), "--image-weights", "1", "0.5"],
            "image-to-text": ["--image", str(picture), "--num-images", "2"], "text-variation": ["a fox"],
            "edit": ["--image", str(picture), "--remove", "fox", "--add", "cat"]}[mode]
    out = tmp_path / "out.png"
    result = run(mode, *args, "--weights", tiny_vd, "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" not in result.stderr
    if mode in ("image-to-text", "text-variation"):
        assert len(result.stdout.strip().splitlines()) == (2 if mode == "image-to-text" else 1)
    else:
        assert Image.open(out).size == (64, 64)


def test_bad_input_exits_with_a_clear_message(tmp_path):
    result = run("text-to-image")
    assert result.returncode == 2 and "needs a prompt" in result.stderr
    result = run("text-to-image", "x", "--weights", str(tmp_path))
    assert result.returncode == 2 and "not a Versatile Diffusion checkpoint folder" in result.stderr
