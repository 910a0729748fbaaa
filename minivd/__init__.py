"""minivd: a minimal, readable PyTorch implementation of Versatile Diffusion (Xu et al., arXiv 2211.08332).

    import minivd
    model = minivd.load("path/to/versatile-diffusion")        # or None: $MINIVD_WEIGHTS, else the tiny demo model
    images = minivd.generate("text-to-image", model=model, prompt="a red fox in the snow", seed=0)
"""

from .model import VersatileDiffusion, demo_model, load
from .pipeline import MODES, edit_image, generate
from .unet import FLOWS

__all__ = ["FLOWS", "MODES", "VersatileDiffusion", "demo_model", "edit_image", "generate", "load"]
