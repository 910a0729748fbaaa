"""The fast and lean paths (attention slicing, decoder-only VAE, tiled decoding, the float16 VAE guard) and the
benchmark's machinery (on a tiny checkpoint only)."""

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import minivd
import weights_loader
from minivd.attention import Attention, attend
from minivd.speed import LowMemory, decode_tiled, float16_guarded, set_attention_slicing
from minivd.tools.random_checkpoint import random_model
from minivd.vae import AutoencoderKL, VAEConfig
from tiny_vd import reference_pipeline

SLICE_ATOL = 1e-6  # fp32: sliced vs whole attention
IMAGE_ATOL = 1e-4  # fp32, [0, 1] images after DDIM steps (as tests/test_generate.py)
DECODE_ATOL = 1e-5  # fp32, decoded images vs diffusers
HALF_TOL = 2e-3  # float16 output rounding of images of magnitude ~1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------------------
# Attention slicing


def attention(context_dim=None, heads=2, head_dim=8, seed=0):
    torch.manual_seed(seed)
    return Attention(heads * head_dim, heads, head_dim, context_dim=context_dim, qkv_bias=True).eval()


@pytest.mark.parametrize("context_dim, causal", [(None, False), (12, False), (None, True)])
@pytest.mark.parametrize("slice_size", [1, 5, 16])
def test_sliced_attention_equals_whole(context_dim, causal, slice_size):
    attn = attention(context_dim)
    x = torch.randn(3, 23, 16)  # 23 query rows: slices of 5 leave a remainder
    context = torch.randn(3, 7, context_dim) if context_dim else None
    with torch.no_grad():
        whole = attn(x, context, causal=causal)
        assert set_attention_slicing(attn, slice_size) == 1
        sliced = attn(x, context, causal=causal)
    assert (sliced - whole).abs().max() < SLICE_ATOL


def test_sliced_attention_equals_explicit_softmax():
    """Against the written-out math, softmax(q k^T / sqrt(d)) v, causal like the CLIP text tower; a probs hook
    sees the full maps and leaves the sliced output bit-identical."""
    from minivd.attention import attention_probs

    attn = attention()
    x = torch.randn(2, 19, 16)
    with torch.no_grad():
        heads = lambda t: t.view(2, 19, attn.heads, attn.head_dim).transpose(1, 2)  # (B, nh, N, hd)
        q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
        explicit = attn.to_out((attention_probs(q, k, causal=True) @ v).transpose(1, 2).reshape(2, 19, -1))
        set_attention_slicing(attn, 4)
        sliced = attn(x, causal=True)
        seen = []
        attn.probs_hook = lambda module, probs: seen.append(probs.shape)
        hooked = attn(x, causal=True)
    assert (sliced - explicit).abs().max() < SLICE_ATOL and torch.equal(hooked, sliced)
    assert seen == [(2, 2, 19, 19)]


def test_set_attention_slicing_reaches_every_attention_and_checks_its_argument():
    model = random_model()
    count = set_attention_slicing(model.unet, 64)
    layers = [m for m in model.unet.modules() if isinstance(m, Attention)]
    assert count == len(layers) > 0 and all(m.attend.keywords == {"slice_size": 64} for m in layers)
    set_attention_slicing(model.unet, None)
    assert all(m.attend is attend for m in layers)
    for bad in (0, -3, 2.5, "8", True):
        with pytest.raises(ValueError, match="slice_size"):
            set_attention_slicing(model.unet, bad)
    with pytest.raises(TypeError, match="nn.Module"):
        set_attention_slicing("unet", 8)


def test_generate_with_slicing_everywhere_equals_diffusers(tiny_vd):
    """Every attention of the UNet, both CLIP towers and the VAE sliced: still diffusers' images."""
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    from PIL import Image

    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    pipe = reference_pipeline("dual-guided", tiny_vd)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(prompt="a fox", image=picture, text_to_image_strength=0.3, num_inference_steps=3, height=64,
                    width=64, latents=x_T.clone(), output_type="np").images
    model = minivd.load(tiny_vd).prepare("dual-guided")
    for module in (model.unet, model.text_encoder, model.image_encoder, model.vae):
        assert set_attention_slicing(module, 5) > 0
    got = minivd.generate("dual-guided", model=model, prompt="a fox", image=picture, mix_ratio=0.3, steps=3,
                          height=64, width=64, latents=x_T, output="np")
    assert np.abs(got - expected).max() < IMAGE_ATOL


# ---------------------------------------------------------------------------------------------------------------------
# The VAE: decoder only, tiles, float16


def tiny_vae(seed=0, **halves):
    torch.manual_seed(seed)
    return AutoencoderKL(VAEConfig.tiny(), **halves).eval()


def test_decoder_only_vae_has_no_encoder_keys_and_decodes_like_the_full_one():
    full = tiny_vae()
    decoder_only = AutoencoderKL(full.cfg, encoder=False).eval()
    assert decoder_only.weight_prefixes() == ["decoder.", "post_quant_conv."]
    state = {k: v for k, v in full.state_dict().items() if k.startswith(tuple(decoder_only.weight_prefixes()))}
    decoder_only.load_state_dict(state, strict=True)
    assert not any(k.startswith(("encoder.", "quant_conv.")) for k in decoder_only.state_dict())
    z = torch.randn(2, 4, 6, 5)
    with torch.no_grad():
        assert torch.equal(decoder_only.decode(z), full.decode(z))
    with pytest.raises(ValueError, match="without its encoder"):
        decoder_only.encode(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="without its decoder"):
        tiny_vae(decoder=False).decode(z)
    with pytest.raises(ValueError, match="encoder, its decoder or both"):
        AutoencoderKL(full.cfg, encoder=False, decoder=False)


def test_decoder_only_vae_loads_from_the_full_file_and_equals_diffusers(tiny_vd):
    """A decoder-only VAE filled from the diffusers VAE file (encoder tensors skipped by prefix) decodes like
    diffusers' AutoencoderKL."""
    from diffusers import AutoencoderKL as ReferenceVAE

    model = minivd.load(tiny_vd)
    with torch.device("meta"):
        vae = AutoencoderKL(model.config.vae, encoder=False)
    file = weights_loader.TensorFile(weights_loader.find_weights(os.path.join(tiny_vd, "vae")))
    weights_loader.load_into(vae, [(file, weights_loader.rules_for("vae"))], prefixes=vae.weight_prefixes())
    reference = ReferenceVAE.from_pretrained(os.path.join(tiny_vd, "vae")).eval()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (vae.eval().decode(z) - reference.decode(z).sample).abs().max() < DECODE_ATOL


def test_tiled_decode_with_one_tile_equals_untiled():
    vae = tiny_vae()
    z = torch.randn(1, 4, 12, 10)  # 24 x 20 pixels
    with torch.no_grad():
        whole = vae.decode(z)
        assert torch.equal(decode_tiled(vae, z, 12), whole)  # tiles in latent pixels: 12 x 12 covers 12 x 10
        assert torch.equal(decode_tiled(vae, z, 32), whole)


def test_tiled_decode_places_and_blends_tiles():
    vae = tiny_vae()  # factor 2: latent pixel = 2 x 2 image pixels
    z = torch.randn(2, 4, 16, 14)
    with torch.no_grad():
        tiled = decode_tiled(vae, z, 8, 0.25)  # 8 x 8 latent tiles, stride 6
        first = vae.decode(z[:, :, :8, :8])  # the top-left tile alone
        last = vae.decode(z[:, :, -8:, -8:])  # the bottom-right tile alone (flush with the end)
        whole = vae.decode(z)
    assert tiled.shape == whole.shape == (2, 3, 32, 28) and torch.isfinite(tiled).all()
    # pixels that only one tile covers are that tile's pixels; the next tiles start at latent 6 (pixel 12)
    assert (tiled[:, :, :12, :12] - first[:, :, :12, :12]).abs().max() < SLICE_ATOL
    # the last tile starts at latent (8, 6); rows 14-15 and columns 8-13 are its alone (pixels 28-31, 16-27)
    assert (tiled[:, :, -4:, -12:] - last[:, :, -4:, -12:]).abs().max() < SLICE_ATOL
    # blended pixels lie between what the overlapping tiles say (a convex combination of them)
    second = vae.decode(z[:, :, :8, 6:14])
    left, right = first[:, :, :12, 12:16], second[:, :, :12, :4]  # the same pixels as each tile decodes them
    lo, hi = torch.minimum(left, right), torch.maximum(left, right)
    seam = tiled[:, :, :12, 12:16]
    assert ((seam >= lo - SLICE_ATOL) & (seam <= hi + SLICE_ATOL)).all()


@pytest.mark.parametrize("tile_size", [0, 15, 2.5, True])
def test_low_memory_rejects_bad_tile_sizes(tile_size):
    with pytest.raises(ValueError, match="vae_tile_size"):
        LowMemory(vae_tile_size=tile_size)


@pytest.mark.parametrize("overlap", [1.0, -0.1])
def test_tiled_decode_rejects_bad_overlaps(overlap):
    with pytest.raises(ValueError, match="tile_overlap"):
        decode_tiled(tiny_vae(), torch.randn(1, 4, 8, 8), 4, overlap)


def guarded_decode(vae, z):
    """What VersatileDiffusion.decode_images runs for float16 weights (minivd.speed.float16_guarded)."""
    return float16_guarded(vae.decode, z, [vae.post_quant_conv, vae.decoder], vae.cfg.force_upcast)


def guarded_encode(vae, x):
    return float16_guarded(lambda x: vae.encode(x)[0], x, [vae.encoder, vae.quant_conv], vae.cfg.force_upcast)


def overflowing_vae():
    """A float16 tiny VAE whose decoder activations exceed float16's range, though its output does not: the first
    conv is scaled up, and the final GroupNorm brings the huge features back to unit scale (as in the real kl-f8 at
    high resolution)."""
    vae = tiny_vae(seed=3)
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(2e5)  # weights up to ~3e4, still float16; features up to ~3e5
        vae.decoder.conv_in.bias.mul_(2e5)
    return vae.half()


def test_float16_vae_decodes_again_in_float32_when_float16_overflows():
    vae16 = overflowing_vae()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    naive = copy.deepcopy(vae16)
    naive.cfg = dataclasses.replace(vae16.cfg, force_upcast=False)
    reference = copy.deepcopy(vae16).float()  # the same (float16-rounded) weights, in float32
    with torch.no_grad():
        assert not torch.isfinite(naive.decode(z)).all()  # the failure the guard exists for
        expected = reference.decode(z.float())
        got = guarded_decode(vae16, z)
    assert torch.isfinite(expected).all() and expected.abs().max() > 0.1
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    assert (got.float() - expected).abs().max() < HALF_TOL * max(1.0, expected.abs().max().item())
    assert all(p.dtype == torch.float16 for p in vae16.parameters())  # weights restored after the call


def test_float16_vae_stays_in_float16_when_nothing_overflows():
    vae16 = tiny_vae(seed=4).half()
    naive = copy.deepcopy(vae16)
    naive.cfg = dataclasses.replace(vae16.cfg, force_upcast=False)  # plain float16, no guard
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)).half()
    x = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).half()
    calls = []
    hook = vae16.decoder.conv_in.register_forward_pre_hook(lambda m, args: calls.append(args[0].dtype))
    with torch.no_grad():
        images = guarded_decode(vae16, z)
        assert torch.equal(images, naive.decode(z))  # the float16 computation itself, not a float32 one cast down
        mean = guarded_encode(vae16, x)
        assert torch.equal(mean, naive.encode(x)[0])
    hook.remove()
    assert calls == [torch.float16] and images.dtype == mean.dtype == torch.float16
    reference = copy.deepcopy(vae16).float()
    with torch.no_grad():
        mean_ref, _ = reference.encode(x.float())
        images_ref = reference.decode(z.float())
    assert (mean.float() - mean_ref).abs().max() < HALF_TOL * max(1.0, mean_ref.abs().max().item())
    assert (images.float() - images_ref).abs().max() < HALF_TOL * max(1.0, images_ref.abs().max().item())


def test_float16_guard_covers_encode_and_leaves_bfloat16_alone():
    vae16 = tiny_vae(seed=4).half()
    with torch.no_grad():
        vae16.encoder.conv_in.weight.mul_(2e5)  # encoder features beyond float16's range
        vae16.encoder.conv_in.bias.mul_(2e5)
    naive = copy.deepcopy(vae16)
    naive.cfg = dataclasses.replace(vae16.cfg, force_upcast=False)
    reference = copy.deepcopy(vae16).float()
    x = (torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1).half()
    with torch.no_grad():
        assert not torch.isfinite(naive.encode(x)[0]).all()
        mean = guarded_encode(vae16, x)
        mean_ref, _ = reference.encode(x.float())
    assert mean.dtype == torch.float16 and torch.isfinite(mean).all()
    assert (mean.float() - mean_ref).abs().max() < HALF_TOL * max(1.0, mean_ref.abs().max().item())
    assert all(p.dtype == torch.float16 for p in vae16.parameters())
    vae_bf16 = tiny_vae(seed=4).to(torch.bfloat16)
    dtypes = []
    vae_bf16.decoder.conv_in.register_forward_pre_hook(lambda m, args: dtypes.append(args[0].dtype))
    with torch.no_grad():
        assert guarded_decode(vae_bf16, torch.randn(1, 4, 4, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert dtypes == [torch.bfloat16]


# ---------------------------------------------------------------------------------------------------------------------
# The benchmark (tiny checkpoint only)


def run_bench(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "minivd.tools.bench", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One tiny benchmark: builds the checkpoint, measures text-to-image at 64 px with minivd and diffusers."""
    tmp = tmp_path_factory.mktemp("bench")
    folder, out = tmp / "ckpt", tmp / "results.md"
    done = run_bench("--tiny", "--folder", str(folder), "--sizes", "64", "--steps", "1", "--threads", "1",
                     "--flows", "text-to-image", "--tensor-peak", "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    return folder, out.read_text()


def test_bench_builds_a_tiny_checkpoint_in_the_official_layout(bench_run):
    folder, _ = bench_run
    assert weights_loader.check(str(folder)) == []  # no missing, unexpected or mis-shaped tensor for minivd
    assert json.loads((folder / "bench_checkpoint.json").read_text())["tiny"] is True
    for name in ("image_unet", "text_unet", "vae", "text_encoder", "image_encoder", "tokenizer", "scheduler",
                 "image_feature_extractor", "model_index.json"):
        assert (folder / name).exists(), name


def test_bench_reports_both_implementations(bench_run):
    folder, report = bench_run
    assert "torch " + torch.__version__ in report and "| flow | size | load s | s / step |" in report
    row = next(line for line in report.splitlines() if line.startswith("| text-to-image | 64 |"))
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    assert len(cells) == 6 and not any("error" in c for c in cells)
    values = []
    for c in cells:  # "minivd / diffusers (ratio)": numbers, the ratio minivd / diffusers of the printed values
        mine, theirs, ratio = (float(v) for v in re.fullmatch(r"(\S+) / (\S+) \((\S+)\)", c).groups())
        assert mine > 0 and theirs > 0 and ratio == pytest.approx(mine / theirs, rel=0.02, abs=0.011)
        values.append(mine)
    # weights held for text-to-image, counted from the official files: image UNet without its context blocks
    # (".attentions."), the text UNet's context blocks, CLIP text, and the VAE's decoder half
    from safetensors import safe_open

    def gib(component, keep):
        path = weights_loader.find_weights(str(folder / component))
        with safe_open(path, "pt") as f:
            tensors = (f.get_tensor(k) for k in f.keys() if keep(k))
            return sum(t.numel() * t.element_size() for t in tensors) / 2**30

    expected = (gib("image_unet", lambda k: ".attentions." not in k) + gib("text_unet", lambda k: ".attentions." in k)
                + gib("text_encoder", lambda k: True) + gib("vae", lambda k: k.startswith(("decoder.", "post_quant"))))
    assert values[3] == pytest.approx(expected, rel=0.005)
    assert values[3] < values[5] < values[4]  # peak tensors: the weights and more, less than the whole process


def test_bench_measures_the_hubs_pickled_format(bench_run):
    """--format bin-fp16 writes a copy of the checkpoint once, as the Hub ships it (pickled .bin files under the Hub's
    names, here fp16), and measures both libraries on it."""
    folder, _ = bench_run
    done = run_bench("--tiny", "--folder", str(folder), "--format", "bin-fp16", "--sizes", "64", "--steps", "1",
                     "--threads", "1", "--flows", "text-to-image")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Weights: bin-fp16 files (fp16 pickles)" in done.stdout
    row = next(line for line in done.stdout.splitlines() if line.startswith("| text-to-image | 64 |"))
    assert "error" not in row and row.count("(") == 5  # every metric measured for both libraries
    pickled = folder.parent / (folder.name + "-bin-fp16")
    for component, name in [("image_unet", "diffusion_pytorch_model.bin"), ("text_encoder", "pytorch_model.bin"),
                            ("optimus", "optimus-vae.pth")]:
        tensors = torch.load(pickled / component / name, weights_only=True)
        assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}, component
    assert not list(pickled.rglob("*.safetensors")) and weights_loader.check(str(pickled)) == []


def test_live_bytes_counts_new_storages_until_they_are_freed():
    """The benchmark's tensor peak on a sequence whose answer is known: views share a storage, tensors made before
    the mode (and their views and in-place results) are not counted, and a freed tensor stops counting."""
    from minivd.tools.memory import LiveBytes

    mib = 2**18  # float32 elements in 1 MiB
    x = torch.ones(mib)
    with LiveBytes() as live:
        a = x * 2  # 1 MiB
        halves, outside = a.chunk(2), x.t()  # views, also of a tensor made before: nothing new
        x.mul_(1)  # in place: nothing new
        b = a + 1  # 2 MiB alive
        del a, halves, outside  # 1 MiB
        c = torch.cat([b, b, x])  # 1 + 3 MiB: the peak
        del b, c
        values, order = torch.ones(mib).sort()  # 1 + 1 + 2 MiB (int64 indices) made, the first freed at once
    assert live.peak == 4 * 2**20 and live.live == 3 * 2**20
    del values, order
    assert live.live == 0


def test_bench_reports_failures_as_cells(bench_run):
    """A measurement that fails (here: a timeout) becomes an 'error [n]' cell with a note, not a crash; a folder
    built tiny is not taken for a full-size one; an unknown flow is refused."""
    folder, _ = bench_run
    done = run_bench("--tiny", "--folder", str(folder), "--sizes", "64", "--steps", "1", "--flows", "text-to-image",
                     "--impls", "minivd", "--timeout", "0.5")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| text-to-image | 64 | error [1] / not run |" in done.stdout and "[1] timed out after 0.5 s" in done.stdout
    full = run_bench("--folder", str(folder), "--flows", "text-to-image")
    assert full.returncode != 0 and "tiny random checkpoint" in full.stderr
    bad = run_bench("--tiny", "--folder", str(folder), "--flows", "text-to-video")
    assert bad.returncode != 0 and "unknown flow" in bad.stderr


def test_full_size_configs_have_the_sizes_of_versatile_diffusion():
    """The full-size benchmark checkpoint is VD's size (VD_REFERENCE: image UNet 0.86 B, text UNet 1.71 B,
    CLIP ViT-L/14), checked on the meta device (no memory) without writing it."""
    from minivd.tools.random_checkpoint import FULL, reference_modules

    modules = reference_modules(FULL, vocab_size=1000)
    millions = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in modules.items()}
    assert millions["image_unet"] == pytest.approx(860, rel=0.01)
    assert millions["text_unet"] == pytest.approx(1710, rel=0.01)
    assert millions["vae"] == pytest.approx(83.7, rel=0.01)
    assert millions["text_encoder"] == pytest.approx(123.7, rel=0.01)
    assert millions["image_encoder"] == pytest.approx(304, rel=0.01)
