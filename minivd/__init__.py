"""minivd: a minimal, readable PyTorch implementation of Versatile Diffusion (Xu et al., arXiv 2211.08332).

    import minivd
    model = minivd.load("path/to/versatile-diffusion")        # or minivd.load(): $MINIVD_WEIGHTS, else the built-in model
    images = minivd.generate("text-to-image", model=model, prompt="a red fox in the snow", seed=0)
"""

from .checkpoint import load
from .extensions import ImagePrompt
from .model import VersatileDiffusion
from .pipeline import MODES, edit_image, generate
from .unet import FLOWS

__all__ = ["FLOWS", "MODES", "ImagePrompt", "VersatileDiffusion", "edit_image", "generate", "load"]
