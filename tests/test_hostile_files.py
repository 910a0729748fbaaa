"""Hostile and corrupt weights files: each is refused at load, before any tensor is read, with an error naming the
file, the tensor and what is wrong; a pickle's stored pages do not stay next to their cast copies."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import minivd
import weights_loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHT = "down_blocks.0.resnets.0.conv1.weight"  # an image_unet float weight


def write_safetensors(path, header, data):
    """A hand-written .safetensors file: 8-byte header length, the JSON header text (as given), the data bytes."""
    text = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text + data)


def header_of(path):
    """(header dict, data bytes) of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), f.read()


def copy_with_unet_header(tiny_vd, tmp_path, edit):
    """A copy of the tiny checkpoint whose image_unet header text is `edit(header dict, header text)`."""
    broken = shutil.copytree(tiny_vd, tmp_path / "broken")
    path = weights_loader.find_weights(os.path.join(broken, "image_unet"))
    header, data = header_of(path)
    write_safetensors(path, edit(header, json.dumps(header)), data)
    return str(broken), path


def refused_at_load(folder, monkeypatch, *patterns):
    """minivd.load(folder) raises ValueError containing every pattern, without reading any tensor's data."""
    def no_read(*args):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(weights_loader.TensorFile, "stored", no_read, raising=False)
    monkeypatch.setattr(minivd.speed.LeanTensorFile, "_mapped", no_read, raising=False)
    with pytest.raises(ValueError) as error:
        minivd.load(folder)
    for pattern in patterns:
        assert pattern in str(error.value), (pattern, str(error.value))


def test_an_integer_tensor_for_a_float_weight_is_named_at_load(tiny_vd, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    broken = shutil.copytree(tiny_vd, tmp_path / "broken")
    path = weights_loader.find_weights(os.path.join(broken, "image_unet"))
    sd = load_file(path)
    sd[WEIGHT] = torch.zeros(sd[WEIGHT].shape, dtype=torch.int32)
    save_file(sd, path)
    refused_at_load(str(broken), monkeypatch, path, repr(WEIGHT), "int32", "float32")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "weights_loader.py"), "check", str(broken)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1 and f"tensor {WEIGHT!r} in {path} is int32" in result.stdout


def test_a_bool_tensor_in_a_pickle_is_named_at_load(tiny_vd_bin, tmp_path, monkeypatch):
    broken = shutil.copytree(tiny_vd_bin, tmp_path / "broken")
    path = weights_loader.find_weights(os.path.join(broken, "image_unet"))
    sd = torch.load(path, weights_only=True)
    sd[WEIGHT] = torch.zeros(sd[WEIGHT].shape, dtype=torch.bool)
    torch.save(sd, path)
    refused_at_load(str(broken), monkeypatch, path, repr(WEIGHT), "bool")


def test_a_tensor_named_twice_in_a_header_is_refused(tiny_vd, tmp_path, monkeypatch):
    """The format forbids a name twice and parsers disagree on which entry wins: refused, naming the tensor."""
    def twice(header, text):
        entry = json.dumps(header[WEIGHT])
        return text[:-1] + f', "{WEIGHT}": {entry}' + "}"

    folder, path = copy_with_unet_header(tiny_vd, tmp_path, twice)
    refused_at_load(folder, monkeypatch, path, f"names tensor {WEIGHT!r} twice")


@pytest.mark.parametrize("edit, message", [
    (lambda h: h[WEIGHT].update(shape=[3, -1]), "has no valid shape"),
    (lambda h: h[WEIGHT].update(shape=h[WEIGHT]["shape"][:-1] + [h[WEIGHT]["shape"][-1] * 2]), "needs"),
    (lambda h: h[WEIGHT].update(data_offsets=[0, 10**12]), "outside the"),
    (lambda h: h[WEIGHT].update(data_offsets="0-4"), "has no valid data_offsets"),
    (lambda h: h[WEIGHT].update(dtype="C64"), "C64 are not read by minivd"),
    (lambda h: h.update(stray=dict(h[WEIGHT])), "overlap"),  # a second tensor on the same bytes
])
def test_a_malformed_header_entry_is_refused(tiny_vd, tmp_path, monkeypatch, edit, message):
    def edited(header, text):
        edit(header)
        return json.dumps(header)

    folder, path = copy_with_unet_header(tiny_vd, tmp_path, edited)
    refused_at_load(folder, monkeypatch, path, message)


MAPPED_PICKLE = """
import sys, torch, minivd.speed
def rss_file():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile")) / 1024
tf = minivd.speed.LeanTensorFile(sys.argv[1])
torch.ones(8).half().float().sum()  # load the code pages this uses before measuring
before = rss_file()
kept = [tf.get(k, dtype=torch.float32 if sys.argv[2] == "cast" else None) for k in tf.keys()]
print(sum(t.float().sum().item() for t in kept) * 0, rss_file() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_a_cast_pickle_keeps_no_stored_copy_in_memory(tmp_path):
    """An fp16 .bin read into float32 (the Hub ships pickles): after each cast, the stored tensor's pages of
    torch.load's map are dropped, so the process holds the float32 weights and not also the fp16 file."""
    path = str(tmp_path / "pytorch_model.bin")
    torch.save({f"w{i}": torch.rand(1024, 2048).half() for i in range(8)}, path)  # 32 MiB of float16
    grown = {}
    for mode in ("stored", "cast"):
        done = subprocess.run([sys.executable, "-c", MAPPED_PICKLE, path, mode], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
        assert done.returncode == 0, done.stderr
        grown[mode] = float(done.stdout.split()[-1])  # MiB of mapped file pages resident after reading
    assert grown["stored"] > 24  # the control: zero-copy tensors are the mapped file, so its pages count
    assert grown["cast"] < 4  # the cast copies' stored pages are gone


def test_cast_pickle_tensors_equal_the_file(tiny_vd_bin):
    """Dropping the pages does not change a number: they are read from the file again if touched."""
    path = weights_loader.find_weights(os.path.join(tiny_vd_bin, "image_unet"))
    reference = torch.load(path, weights_only=True)
    tf = minivd.speed.LeanTensorFile(path)
    for key, tensor in reference.items():
        assert torch.equal(tf.get(key, dtype=torch.float16), tensor.half())
        assert torch.equal(tf.get(key), tensor)  # the stored tensor, after its pages were dropped
