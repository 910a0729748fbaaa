"""weights_loader: full-size key coverage on the meta device, the check/convert command line, and bad files."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import minivd
import weights_loader
from minivd.clip import CLIPTextConfig, CLIPTextEncoder, CLIPVisionConfig, CLIPVisionEncoder
from minivd.unet import DualContextUNet, UNetConfig
from minivd.vae import AutoencoderKL, VAEConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VD_UNET = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
               attention_head_dim=8)


class MetaFile:
    """The key/shape view of a reference module's state dict, shaped like weights_loader.TensorFile."""

    def __init__(self, module, path):
        self.shapes, self.path = {k: tuple(v.shape) for k, v in module.state_dict().items()}, path

    def keys(self):
        return list(self.shapes)

    def shape(self, key):
        return self.shapes[key]


def official_modules():
    """The official component classes with VD's full-size configs, on the meta device (no memory, no download)."""
    from diffusers import AutoencoderKL as RefVAE, UNet2DConditionModel
    from diffusers.pipelines.deprecated.versatile_diffusion.modeling_text_unet import UNetFlatConditionModel
    from transformers import CLIPTextConfig as RefText, CLIPTextModelWithProjection
    from transformers import CLIPVisionConfig as RefVision, CLIPVisionModelWithProjection

    with torch.device("meta"):
        return dict(
            image_unet=UNet2DConditionModel(
                in_channels=4, out_channels=4, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, **VD_UNET),
            text_unet=UNetFlatConditionModel(
                in_channels=(768, 1, 1), out_channels=(768, 1, 1),
                down_block_types=("CrossAttnDownBlockFlat",) * 3 + ("DownBlockFlat",),
                up_block_types=("UpBlockFlat",) + ("CrossAttnUpBlockFlat",) * 3, **VD_UNET),
            vae=RefVAE(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                       down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
            text_encoder=CLIPTextModelWithProjection(RefText(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, projection_dim=768)),
            image_encoder=CLIPVisionModelWithProjection(RefVision(
                hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                image_size=224, patch_size=14, projection_dim=768)),
        )


def test_full_size_keys_all_map_and_fill_every_parameter():
    ref = official_modules()
    unet_cfg = UNetConfig.from_hf_config(dict(ref["image_unet"].config), dict(ref["text_unet"].config))
    assert unet_cfg == UNetConfig()  # the official configs give minivd's defaults
    with torch.device("meta"):
        mine = dict(
            image_unet=DualContextUNet(unet_cfg, data=("image",), context=("image",)),
            text_unet=DualContextUNet(unet_cfg, data=("text",), context=("text",)),
            vae=AutoencoderKL(VAEConfig.from_hf_config(dict(ref["vae"].config))),
            text_encoder=CLIPTextEncoder(CLIPTextConfig.from_hf_config(ref["text_encoder"].config.to_dict())),
            image_encoder=CLIPVisionEncoder(CLIPVisionConfig.from_hf_config(ref["image_encoder"].config.to_dict())),
        )
    for name, module in mine.items():
        official = MetaFile(ref[name], name)
        sources, problems = weights_loader.plan(module, [(official, weights_loader.rules_for(name, unet_cfg))])
        assert problems == [], f"{name}: {problems[:5]}"
        used = {key for _, key in sources.values()}
        dropped = [k for k in official.keys() if weights_loader.rename(k, weights_loader.rules_for(name, unet_cfg)) is None]
        assert used | set(dropped) == set(official.keys()), f"{name}: keys not consumed"
        assert len(sources) == len(module.state_dict())
    n_text_unet = sum(p.numel() for p in ref["text_unet"].parameters())
    n_data_text = sum(p.numel() for p in mine["text_unet"].data["text"].parameters())
    assert round(n_text_unet / 1e9, 2) == 1.71 and round(n_data_text / 1e9, 2) == 1.44  # VD_REFERENCE §3


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "weights_loader.py"), *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_check_cli_passes_on_both_layouts(tiny_vd, tiny_vd_bin):
    for folder in (tiny_vd, tiny_vd_bin):
        result = run_cli("check", folder)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "OK" in result.stdout


def rewrite(folder, component, edit):
    """Apply edit(state_dict) to a component's safetensors file."""
    from safetensors.torch import load_file, save_file

    path = weights_loader.find_weights(os.path.join(folder, component))
    sd = load_file(path)
    edit(sd)
    save_file(sd, path)


def test_check_cli_names_missing_unexpected_and_misshaped(tiny_vd, tmp_path):
    broken = shutil.copytree(tiny_vd, tmp_path / "broken")
    key = "down_blocks.0.resnets.0.conv1.weight"

    def edit(sd):
        sd.pop("conv_in.bias")
        sd[key] = torch.zeros(3, 3)
        sd["extra.weight"] = torch.zeros(1)

    rewrite(broken, "image_unet", edit)
    result = run_cli("check", str(broken))
    assert result.returncode == 1
    assert "missing tensor for minivd 'data.image.blocks.0.bias'" in result.stdout
    assert f"mis-shaped tensor '{key}'" in result.stdout and "[3, 3]" in result.stdout
    assert "unexpected tensor 'extra.weight'" in result.stdout
    with pytest.raises(ValueError, match="mis-shaped tensor"):
        minivd.load(str(broken))


def test_convert_bin_to_safetensors_keeps_keys_and_numbers(tiny_vd_bin, tmp_path):
    out = tmp_path / "converted"
    result = run_cli("convert", tiny_vd_bin, str(out))
    assert result.returncode == 0, result.stderr
    for component in weights_loader.COMPONENTS:
        src = weights_loader.TensorFile(weights_loader.find_weights(os.path.join(tiny_vd_bin, component)))
        dst = weights_loader.TensorFile(weights_loader.find_weights(str(out / component)))
        assert dst.path.endswith(".safetensors") and set(src.keys()) == set(dst.keys())
        assert all(torch.equal(src.get(k), dst.get(k)) for k in src.keys())
    assert run_cli("check", str(out)).returncode == 0
    half = tmp_path / "half"
    assert run_cli("convert", tiny_vd_bin, str(half), "--dtype", "float16").returncode == 0
    tf = weights_loader.TensorFile(weights_loader.find_weights(str(half / "image_unet")))
    assert all(tf.get(k).dtype == torch.float16 for k in tf.keys())


def test_not_a_checkpoint_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a Versatile Diffusion checkpoint folder"):
        minivd.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such checkpoint folder"):
        minivd.load(str(tmp_path / "nowhere"))


def test_missing_weights_file(tiny_vd, tmp_path):
    broken = shutil.copytree(tiny_vd, tmp_path / "broken")
    os.remove(weights_loader.find_weights(os.path.join(broken, "vae")))
    with pytest.raises(ValueError, match="vae: no weights file"):
        minivd.load(str(broken))


@pytest.mark.parametrize("layout", ["safetensors", "bin"])
def test_truncated_weights_file(tiny_vd, tiny_vd_bin, tmp_path, layout):
    broken = shutil.copytree(tiny_vd if layout == "safetensors" else tiny_vd_bin, tmp_path / "broken")
    path = weights_loader.find_weights(os.path.join(broken, "image_unet"))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        minivd.load(str(broken)).prepare("text-to-image")


def test_pickle_that_runs_code_is_refused(tiny_vd_bin, tmp_path):
    broken = shutil.copytree(tiny_vd_bin, tmp_path / "broken")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    path = weights_loader.find_weights(os.path.join(broken, "vae"))
    torch.save({"encoder.conv_in.weight": Payload()}, path)
    with pytest.raises(ValueError, match="refusing to load"):
        minivd.load(str(broken))
    assert not marker.exists()


def test_tensors_read_in_another_dtype_equal_the_safetensors_reference(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(3, 5, generator=g), "f16": torch.randn(7, generator=g).half(),
               "bf16": torch.randn(2, 2, 2, generator=g).bfloat16(), "i64": torch.arange(6).reshape(2, 3),
               "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)}
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    reference, tf = load_file(path), weights_loader.TensorFile(path)
    dtypes = (None, torch.float32, torch.float16, torch.bfloat16)
    got = {(key, dtype): tf.get(key, dtype=dtype) for key in reference for dtype in dtypes}  # all kept: no aliasing
    for (key, dtype), tensor in got.items():
        expected = reference[key]
        assert tf.shape(key) == tuple(expected.shape)
        want = expected.to(dtype) if dtype is not None and expected.is_floating_point() else expected
        assert tensor.dtype == want.dtype and torch.equal(tensor, want), (key, dtype)


def test_tensors_at_unaligned_offsets_are_read_like_safetensors_does(tmp_path):
    """A hand-written file whose data starts at an odd byte (writers pad the header; the format does not require
    it): casts read through the memory map at those offsets."""
    from safetensors.torch import load_file

    tensors = {"b": torch.tensor([1.5, -2.0], dtype=torch.float16), "a": torch.arange(6.0).reshape(2, 3)}
    header = {"b": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
              "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [4, 28]}}
    text = json.dumps(header).encode()
    text += b" " * ((8 - (8 + len(text)) % 8) % 8 + 1)  # one space more than 8-byte alignment needs
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(t.numpy().tobytes() for t in tensors.values()))
    reference, tf = load_file(str(path)), weights_loader.TensorFile(str(path))
    for key, dtype in [("a", torch.bfloat16), ("a", torch.float16), ("b", torch.float32), ("a", None)]:
        want = reference[key] if dtype is None else reference[key].to(dtype)
        assert torch.equal(tf.get(key, dtype=dtype), want), (key, dtype)


def test_a_safetensors_dtype_minivd_does_not_read_is_named(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "f8.safetensors")
    save_file({"w": torch.zeros(4).to(torch.float8_e4m3fn)}, path)
    with pytest.raises(ValueError, match="not a readable safetensors file.*F8_E4M3 are not read by minivd"):
        weights_loader.TensorFile(path)


MAPPED_PAGES = """
import sys, torch, minivd.speed
def rss_file():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("RssFile")) / 1024
tf = minivd.speed.LeanTensorFile(sys.argv[1])
torch.ones(8).bfloat16().float().sum()  # load the code pages this uses before measuring
before = rss_file()
kept = [tf.get(k, dtype=None if sys.argv[2] == "stored" else torch.bfloat16) for k in tf.keys()]
print(sum(t.float().sum().item() for t in kept) * 0, rss_file() - before)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_a_dtype_change_keeps_no_mapped_copy_of_the_file(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "big.safetensors")
    save_file({f"w{i}": torch.rand(1024, 1024) for i in range(8)}, path)  # 32 MiB of float32
    grown = {}
    for mode in ("stored", "bfloat16"):
        done = subprocess.run([sys.executable, "-c", MAPPED_PAGES, path, mode], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__))))
        assert done.returncode == 0, done.stderr
        grown[mode] = float(done.stdout.split()[-1])  # MiB of mapped file pages resident after reading
    assert grown["stored"] > 24  # the control: zero-copy tensors are the mapped file, so its pages count
    assert grown["bfloat16"] < 8  # a cast copy's mapped pages are dropped after the cast: none stay behind
