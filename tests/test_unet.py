"""The dual-context UNet against diffusers, loaded by minivd from the same tiny official-layout files.

References: image_unet (image data + image context), the text-to-image pipeline's image_unet with its attention blocks
swapped in from text_unet (image data + text context), the dual-guided pipeline's DualTransformer2DModel mixing, and
UNetFlatConditionModel as stored (text data + text context) and with image_unet's attention blocks (image context).
"""

import pytest
import torch

import minivd
from tiny_vd import reference_components, reference_pipeline

ATOL = 1e-5  # fp32, noise predictions of magnitude ~1


def noise_inputs(kind, batch=2, h=8, w=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, h, w, generator=g) if kind == "image" else torch.randn(batch, 32, 1, 1, generator=g)
    return x, torch.tensor([981, 421][:batch]), torch.randn(batch, 77, 32, generator=g), torch.randn(batch, 257, 32, generator=g)


@torch.no_grad()
def test_image_data_image_context_equals_image_unet(tiny_vd):
    m = minivd.load(tiny_vd).prepare("image-variation")
    ref = reference_components(tiny_vd)["image_unet"]
    x, t, _, img_ctx = noise_inputs("image", h=8, w=16)
    expected = ref(x, t, encoder_hidden_states=img_ctx).sample
    got = m.unet(x, t, [("image", img_ctx, 1.0)], data="image")
    assert (got - expected).abs().max() < ATOL


@torch.no_grad()
def test_image_data_text_context_equals_swapped_unet(tiny_vd):
    m = minivd.load(tiny_vd).prepare("text-to-image")
    ref = reference_pipeline("text-to-image", tiny_vd).image_unet
    x, t, txt_ctx, _ = noise_inputs("image")
    expected = ref(x, t, encoder_hidden_states=txt_ctx).sample
    assert (m.unet(x, t, [("text", txt_ctx, 1.0)], data="image") - expected).abs().max() < ATOL


@pytest.mark.parametrize("mix_ratio", [0.0, 0.3, 0.5, 1.0])
@torch.no_grad()
def test_dual_context_mixing_equals_dual_transformer(tiny_vd, mix_ratio):
    m = minivd.load(tiny_vd).prepare("dual-guided")
    pipe = reference_pipeline("dual-guided", tiny_vd)
    pipe.set_transformer_params(mix_ratio, ("text", "image"))
    x, t, txt_ctx, img_ctx = noise_inputs("image")
    expected = pipe.image_unet(x, t, encoder_hidden_states=torch.cat([txt_ctx, img_ctx], dim=1)).sample
    contexts = [("text", txt_ctx, mix_ratio), ("image", img_ctx, 1 - mix_ratio)]
    assert (m.unet(x, t, contexts, data="image") - expected).abs().max() < ATOL


@torch.no_grad()
def test_flat_text_unet_equals_unet_flat_condition_model(tiny_vd):
    m = minivd.load(tiny_vd).prepare("text-variation")
    ref = reference_components(tiny_vd)["text_unet"]
    x, t, txt_ctx, _ = noise_inputs("text")
    expected = ref(x, t, encoder_hidden_states=txt_ctx).sample
    got = m.unet(x, t, [("text", txt_ctx, 1.0)], data="text")
    assert got.shape == (2, 32, 1, 1)
    assert (got - expected).abs().max() < ATOL


@torch.no_grad()
def test_flat_text_unet_with_image_context_equals_swapped_flat_unet(tiny_vd):
    m = minivd.load(tiny_vd).prepare("image-to-text")
    c = reference_components(tiny_vd)
    ref, image_unet = c["text_unet"], c["image_unet"]
    for name, module in list(ref.named_modules()):  # put image_unet's context blocks into the flat UNet
        if type(module).__name__ == "Transformer2DModel":
            parent, index = name.rsplit(".", 1)
            ref.get_submodule(parent)[int(index)] = image_unet.get_submodule(parent)[int(index)]
    x, t, _, img_ctx = noise_inputs("text")
    expected = ref(x, t, encoder_hidden_states=img_ctx).sample
    assert (m.unet(x, t, [("image", img_ctx, 1.0)], data="text") - expected).abs().max() < ATOL


@torch.no_grad()
def test_pickled_bin_folder_loads_the_same_numbers(tiny_vd_bin):
    m = minivd.load(tiny_vd_bin).prepare("text-to-image")
    ref = reference_pipeline("text-to-image", tiny_vd_bin).image_unet
    x, t, txt_ctx, _ = noise_inputs("image", seed=3)
    expected = ref(x, t, encoder_hidden_states=txt_ctx).sample
    assert (m.unet(x, t, [("text", txt_ctx, 1.0)], data="image") - expected).abs().max() < ATOL


def test_per_flow_loading_reads_only_what_the_flow_uses(tiny_vd):
    m = minivd.load(tiny_vd).prepare("text-to-image")
    assert set(m.unet.data) == {"image"} and set(m.unet.context) == {"text"}
    assert m.image_encoder is None and m.text_encoder is not None
    m.prepare("image-variation", drop_unused=True)
    assert set(m.unet.context) == {"image"} and m.text_encoder is None and m.image_encoder is not None
    assert all(p.device.type == "cpu" for p in m.unet.parameters())  # nothing left on the meta device


def test_layout_of_the_full_size_unet():
    from minivd.unet import UNetConfig, unet_layout

    layout = unet_layout(UNetConfig())
    assert len(layout) == 30  # VD_REFERENCE §5: 30 data blocks, 16 context blocks
    assert sum(s.context is not None for s in layout) == 16
    assert [i for i, s in enumerate(layout) if s.kind == "up"] == [17, 21, 25]
    assert [i for i, s in enumerate(layout) if s.kind == "down"] == [3, 6, 9]
