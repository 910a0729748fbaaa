"""The command line never prints a traceback: a user's mistake is one line and exit status 2, any other failure one
line and exit status 1, from `python -m minivd` and from the installed `minivd` command alike."""

import os
import shutil
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

import minivd
import minivd.__main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict({k: v for k, v in os.environ.items() if k not in ("MINIVD_WEIGHTS", "MINIVD_TRACEBACK")}, PYTHONPATH=ROOT)


def run(*args, command=(sys.executable, "-m", "minivd")):
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)


def one_line_error(result, status, text):
    """Exit status `status`, no traceback, one "error: ..." message holding `text` (a message may explain itself on
    the lines after it, e.g. the folder layouts minivd reads), and warnings as one line each."""
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr and 'File "' not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and text in result.stderr[result.stderr.index("error: "):], result.stderr
    assert all(line.startswith("warning: ") for line in result.stderr.splitlines() if "Warning" in line), result.stderr


def huge_png(path, side=100_000):
    """A PNG whose header claims side x side pixels (a decompression bomb): Pillow refuses it when opening."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "notes.txt").write_text("not an image")
    (tmp / "folder").mkdir()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(tmp / "red.png")
    return dict(text=str(tmp / "notes.txt"), folder=str(tmp / "folder"), image=str(tmp / "red.png"),
                bomb=str(huge_png(tmp / "bomb.png")), tmp=tmp)


@pytest.mark.parametrize("args, text", [
    (["image-variation", "--image", "{text}"], "--image {text}: not an image Pillow can read"),
    (["image-variation", "--image", "{folder}"], "--image {folder}: is a folder, not an image file"),
    (["image-variation", "--image", "{folder}/nowhere.png"], "no such file"),
    (["image-variation", "--image", "{bomb}"], "--image {bomb}: not an image Pillow can read"),
    (["multi-context", "--image", "{image}", "--mask", "{text}"], "--mask {text}"),
    (["text-to-image", "a fox", "--device", "gpu"], "device must be 'cpu', 'cuda', 'cuda:N'"),
    (["text-to-image", "a fox", "--device", "cuda:7"], "device 'cuda:7'"),
    (["text-to-image", "a fox", "--out", "{text}/fox.png"], "is not a folder (it is a file)"),
    (["text-to-image", "a fox", "--out", "{folder}"], "is a folder"),
    (["text-to-image", "a fox", "--out", "fox.unknown"], "Pillow cannot write .unknown files"),
    (["text-to-image", "a fox", "--weights", "{folder}"], "not a Versatile Diffusion checkpoint folder"),
    (["text-to-image", "a \udcff fox"], "prompt[0] is not valid text"),
])
def test_a_users_mistake_is_one_line(files, args, text):
    fill = lambda s: s.format(**files)
    one_line_error(run(*map(fill, args), "--steps", "1", "--height", "16", "--width", "16"), 2, fill(text))


def test_out_is_checked_before_the_weights_are_read(files):
    """A bad --out is reported before loading (which takes minutes with real weights), not after."""
    result = run("text-to-image", "a fox", "--weights", os.path.join(files["folder"], "missing"), "--out",
                 os.path.join(files["text"], "fox.png"))
    one_line_error(result, 2, "--out")


def test_an_unforeseen_failure_is_one_line_too(monkeypatch, capsys, tmp_path):
    """An error minivd did not foresee (here a RuntimeError from inside generate) is one line, exit status 1;
    MINIVD_TRACEBACK=1 lets it through with its traceback."""
    def broken(*args, **kwargs):
        raise RuntimeError("the kernel failed")

    monkeypatch.setattr(minivd, "generate", broken)
    monkeypatch.delenv("MINIVD_TRACEBACK", raising=False)
    out = str(tmp_path / "fox.png")
    assert cli.main(["text-to-image", "a fox", "--steps", "1", "--out", out]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: RuntimeError: the kernel failed (MINIVD_TRACEBACK=1 shows where)"
    monkeypatch.setenv("MINIVD_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="the kernel failed"):
        cli.main(["text-to-image", "a fox", "--steps", "1", "--out", out])


def installed_command():
    """The `minivd` console script installed with this package ([project.scripts] in pyproject.toml), if any."""
    return shutil.which("minivd", path=os.path.dirname(sys.executable))


@pytest.mark.skipif(installed_command() is None, reason="the minivd command is not installed (pip install -e .)")
@pytest.mark.parametrize("args, status, text", [
    (["text-to-image", "a fox", "--device", "gpu"], 2, "device must be"),
    (["image-variation", "--image", "{folder}"], 2, "is a folder"),
    (["text-to-image"], 2, "needs a prompt"),
])
def test_the_installed_command_prints_one_line(files, args, status, text):
    result = run(*(a.format(**files) for a in args), command=(installed_command(),))
    one_line_error(result, status, text)
