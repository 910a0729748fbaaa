"""The toy world: one solid shape on a black background, and the captions that describe it.

A scene has four attributes, each from a short list:
    size    small, large                                            (2)
    colour  red, green, blue, yellow, purple, white                 (6)
    shape   circle, square, triangle, cross                         (4)
    place   left, right, top, bottom, centre                        (5)
which gives 2 x 6 x 4 x 5 = 240 scene classes. Every class is drawable and every one is used in training.

Images are drawn with Pillow at 4x the output size and shrunk with a box filter (anti-aliased edges). A random
generator adds a little jitter (position, extent, rotation, colour shade) so that two renders of one scene differ,
while every attribute stays unambiguous: small shapes are 14-18 px across at 64 px, large ones 26-30 px, and the
five places are 14 px apart with at most 2.5 px of jitter.

The caption language: every caption is one of `TEMPLATES` filled with the four attributes, e.g.
    "a small red circle on the left"            (template 0, the canonical form)
    "the circle on the left is small and red"   (template 4)
`parse_caption` inverts `caption` and returns None for any other text: that is how "in the caption language" is
measured. All randomness comes from a numpy Generator passed in (or built from a seed); nothing uses global RNGs.

Legend for shape comments: B batch, S image side (64).
"""

import math
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES = ("circle", "square", "triangle", "cross")
PLACES = ("left", "right", "top", "bottom", "centre")
ATTRIBUTES = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "place": PLACES}

RGB = {"red": (225, 35, 35), "green": (35, 200, 50), "blue": (45, 80, 235), "yellow": (235, 215, 35),
       "purple": (160, 45, 205), "white": (235, 235, 235)}
# the shape's centre, as a fraction of the image side (x, y)
CENTRES = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "centre": (0.5, 0.5)}
# the shape's extent (width of its bounding box before rotation), as a fraction of the image side: (low, high)
EXTENTS = {"small": (14 / 64, 18 / 64), "large": (26 / 64, 30 / 64)}
JITTER = 2.5 / 64  # the most the centre moves, as a fraction of the side
MAX_ROTATION = 10.0  # degrees, for the shapes that are not circles
SUPERSAMPLE = 4

PLACE_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
                 "centre": "in the centre"}
TEMPLATES = (
    "a {size} {colour} {shape} {place}",
    "there is a {size} {colour} {shape} {place}",
    "{place}, a {size} {colour} {shape}",
    "a {colour} {shape} that is {size}, {place}",
    "the {shape} {place} is {size} and {colour}",
)


@dataclass(frozen=True)
class Scene:
    """The four attributes of a scene, e.g. Scene("small", "red", "circle", "left")."""

    size: str
    colour: str
    shape: str
    place: str

    def __post_init__(self):
        for name, values in ATTRIBUTES.items():
            if getattr(self, name) not in values:
                raise ValueError(f"{name} must be one of {values}, got {getattr(self, name)!r}")

    def labels(self):
        """(size, colour, shape, place) as indices into SIZES, COLOURS, SHAPES, PLACES."""
        return tuple(values.index(getattr(self, name)) for name, values in ATTRIBUTES.items())

    @property
    def index(self):
        """The scene class, 0..239 (the order of `all_scenes`)."""
        s, c, h, p = self.labels()
        return ((s * len(COLOURS) + c) * len(SHAPES) + h) * len(PLACES) + p

    @classmethod
    def from_labels(cls, labels):
        """The inverse of `labels`."""
        return cls(*(values[int(i)] for values, i in zip(ATTRIBUTES.values(), labels)))


def all_scenes():
    """The 240 scene classes, in `Scene.index` order."""
    return [Scene(s, c, h, p) for s in SIZES for c in COLOURS for h in SHAPES for p in PLACES]


def sample_scenes(n, seed=0):
    """n scenes with every attribute drawn uniformly and independently (deterministic from `seed`)."""
    rng = np.random.default_rng(seed)
    picks = [rng.integers(len(values), size=n) for values in ATTRIBUTES.values()]  # 4 x (n,)
    return [Scene.from_labels(labels) for labels in zip(*picks)]


# --- Drawing ------------------------------------------------------------------------------------------------------

def _outline(shape, cx, cy, extent, angle):
    """The polygon of a square, triangle or cross with bounding-box width `extent`, centred at (cx, cy) and
    rotated by `angle` degrees, as a list of (x, y) points (image coordinates, y down)."""
    h = extent / 2
    if shape == "square":
        points = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "triangle":  # equilateral, pointing up, its bounding box centred on (cx, cy)
        t = extent * math.sqrt(3) / 4  # half the height
        points = [(0, -t), (h, t), (-h, t)]
    elif shape == "cross":  # a plus sign whose arms are a third of the extent wide
        a = extent / 6
        points = [(-a, -h), (a, -h), (a, -a), (h, -a), (h, a), (a, a), (a, h), (-a, h), (-a, a), (-h, a), (-h, -a),
                  (-a, -a)]
    else:
        raise ValueError(f"no outline for {shape!r}")
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in points]


def render(scene, size=64, rng=None):
    """Draw `scene` -> PIL RGB image (size x size). rng: a numpy Generator for the jitter; None draws the scene's
    typical picture (no jitter, mid-range extent, the base colour)."""
    big = size * SUPERSAMPLE
    fx, fy = CENTRES[scene.place]
    low, high = EXTENTS[scene.size]
    rgb = np.array(RGB[scene.colour], dtype=np.float64)
    if rng is None:
        dx = dy = angle = 0.0
        extent = (low + high) / 2
    else:
        dx, dy = rng.uniform(-JITTER, JITTER, size=2)
        extent = rng.uniform(low, high)
        angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
        rgb = rgb * rng.uniform(0.85, 1.0) + rng.uniform(-12, 12, size=3)  # a slightly different shade
    cx, cy, extent = (fx + dx) * big, (fy + dy) * big, extent * big
    fill = tuple(int(v) for v in np.clip(rgb, 0, 255).round())

    canvas = Image.new("RGB", (big, big))
    draw = ImageDraw.Draw(canvas)
    if scene.shape == "circle":
        draw.ellipse([cx - extent / 2, cy - extent / 2, cx + extent / 2, cy + extent / 2], fill=fill)
    else:
        draw.polygon(_outline(scene.shape, cx, cy, extent, angle), fill=fill)
    return canvas.reduce(SUPERSAMPLE)  # box filter: each output pixel is the mean of 4 x 4 drawn pixels


def to_tensor(images):
    """A list of B PIL RGB images -> float tensor (B, 3, S, S) in [0, 1]."""
    pixels = np.stack([np.asarray(image, dtype=np.uint8) for image in images])  # (B, S, S, 3)
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # (B, S, S, 3) -> (B, 3, S, S)


# --- Captions -----------------------------------------------------------------------------------------------------

def caption(scene, template=None):
    """The caption of `scene` in template number `template` (0..4; None or 0: the canonical form)."""
    words = {"size": scene.size, "colour": scene.colour, "shape": scene.shape, "place": PLACE_PHRASES[scene.place]}
    return TEMPLATES[template or 0].format(**words)


def _template_pattern(template):
    """A regex matching one template exactly, with a named group per attribute."""
    choices = {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "place": tuple(PLACE_PHRASES.values())}
    pattern = re.escape(template)
    for name, words in choices.items():
        pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{'|'.join(words)})")
    return re.compile(pattern)


_PATTERNS = [_template_pattern(t) for t in TEMPLATES]
_PLACE_OF_PHRASE = {phrase: place for place, phrase in PLACE_PHRASES.items()}


def normalise_text(text):
    """Lowercase, one space between words, no space before a comma, no trailing full stop: the form in which
    captions are compared (a tokenizer's decoding may write "left , a" for "left, a")."""
    text = " ".join(text.lower().split())
    text = re.sub(r"\s*,\s*", ", ", text)
    return text.rstrip(". ")


def parse_caption(text):
    """A caption -> its Scene, or None when `text` is not in the caption language (no template matches)."""
    found = parse_caption_template(text)
    return None if found is None else found[0]


def parse_caption_template(text):
    """A caption -> (Scene, template number), or None when `text` is not in the caption language."""
    if not isinstance(text, str):
        return None
    text = normalise_text(text)
    for number, pattern in enumerate(_PATTERNS):
        match = pattern.fullmatch(text)
        if match:
            words = match.groupdict()
            return Scene(words["size"], words["colour"], words["shape"], _PLACE_OF_PHRASE[words["place"]]), number
    return None


def all_captions():
    """Every sentence of the caption language: 240 scenes x 5 templates = 1200, in (scene, template) order."""
    return [caption(scene, t) for scene in all_scenes() for t in range(len(TEMPLATES))]


# --- Training batches ---------------------------------------------------------------------------------------------

def batches(batch_size, seed=0, size=64):
    """Endless training batches drawn on the fly: yields (images, captions, labels) with
    images (B, 3, S, S) float in [0, 1], captions a list of B str (a random template each),
    labels (B, 4) long: size, colour, shape, place indices. Deterministic from `seed`."""
    rng = np.random.default_rng(seed)
    while True:
        picks = [rng.integers(len(values), size=batch_size) for values in ATTRIBUTES.values()]
        scenes = [Scene.from_labels(labels) for labels in zip(*picks)]
        templates = rng.integers(len(TEMPLATES), size=batch_size)
        images = to_tensor([render(scene, size, rng) for scene in scenes])
        captions = [caption(scene, int(t)) for scene, t in zip(scenes, templates)]
        labels = torch.tensor([scene.labels() for scene in scenes], dtype=torch.long)  # (B, 4)
        yield images, captions, labels
