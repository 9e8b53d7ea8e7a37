"""Procedural shape scenes with ground truth: sampling (pure, seeded) and rendering (PIL + numpy).

A :class:`Scene` is the ground truth: image size, a nameable background colour, and 1 to 6
non-overlapping objects, each with a kind, a colour, a size class and a bounding box
``(x0, y0, x1, y1)`` in pixels, end-exclusive (PIL's crop-box convention, so
``image.crop(obj.box)`` is the object). OCR scenes also carry one short upper-case word.

Everything is deterministic from the seed: :func:`sample_scene` draws the ground truth with
``random.Random(seed)``; :func:`render_scene` draws the image from the scene alone (its
background texture and pixel noise come from ``numpy.random.default_rng(scene.seed)``).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pairforge.errors import PairforgeError

WORLD_NAME = "shapes"

#: Shape colours (name → RGB), chosen to stay apart from each other and from every background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (245, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "pink": (250, 130, 200),
    "brown": (140, 85, 40),
}

#: Nameable background colours (name → base RGB); a light texture and noise vary them.
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (215, 200, 165),
    "light blue": (165, 200, 235),
    "light green": (175, 220, 170),
    "dark": (40, 42, 50),
}

KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS: dict[str, str] = {k: ("crosses" if k == "cross" else k + "s") for k in KINDS}

#: Size classes and their side length range in pixels at the default 112 px image size
#: (scaled with the image's shorter side).
SIZES: tuple[str, ...] = ("small", "large")
SIZE_RANGE: dict[str, tuple[int, int]] = {"small": (14, 19), "large": (27, 35)}

#: Short upper-case words drawn on OCR scenes (none is a colour, kind or size word).
OCR_WORDS: tuple[str, ...] = ("CAT", "DOG", "SUN", "MAP", "KEY", "CUP", "HAT", "BUS", "PEN", "FOX")

MIN_CONTRAST = 80.0  # minimum RGB distance between a shape colour and its background
MAX_OBJECTS = 6
_GAP = 2  # pixels kept free between boxes and from the image border


def colors_for(background: str) -> list[str]:
    """The shape colours allowed on ``background`` (far enough from it in RGB)."""
    b = BACKGROUNDS[background]
    return [c for c, rgb in COLORS.items() if math.dist(rgb, b) >= MIN_CONTRAST]


@dataclass(frozen=True)
class Obj:
    """One shape: kind, colour, size class and its bounding box (end-exclusive pixels)."""

    kind: str
    color: str
    size: str
    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2)


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. ``seed`` drives the rendering noise; ``word``/``word_box``
    are set on OCR scenes only."""

    width: int
    height: int
    background: str
    objects: tuple[Obj, ...]
    seed: int
    word: str | None = None
    word_box: tuple[int, int, int, int] | None = None

    def to_dict(self) -> dict:
        """The typed ``scene`` column value (see :func:`pairforge.world.dataset.features`)."""
        return {
            "width": self.width, "height": self.height, "background": self.background,
            "seed": self.seed, "word": self.word,
            "word_box": list(self.word_box) if self.word_box else [],
            "objects": [{k: v for k, v in asdict(o).items()} for o in self.objects],
        }

    @staticmethod
    def from_dict(d: dict) -> "Scene":
        objs = tuple(Obj(**{k: o[k] for k in ("kind", "color", "size", "x0", "y0", "x1", "y1")})
                     for o in d["objects"])
        wb = d.get("word_box") or None
        return Scene(int(d["width"]), int(d["height"]), d["background"], objs, int(d["seed"]),
                     d.get("word"), tuple(wb) if wb else None)


# ----------------------------------------------------------------------------- geometry


def _outline(kind: str, s: int) -> list[tuple[float, float]] | None:
    """Polygon of ``kind`` inside an ``s``×``s`` box at the origin (None for the circle)."""
    e = s - 1  # last pixel index inside the box
    if kind == "square":
        m = round(s * 0.08)  # a slightly smaller square keeps the areas of kinds comparable
        return [(m, m), (e - m, m), (e - m, e - m), (m, e - m)]
    if kind == "triangle":
        return [(e / 2, 0), (e, e), (0, e)]
    if kind == "diamond":
        return [(e / 2, 0), (e, e / 2), (e / 2, e), (0, e / 2)]
    if kind == "cross":
        a, b = round(s / 3), e - round(s / 3)
        return [(a, 0), (b, 0), (b, a), (e, a), (e, b), (b, b), (b, e), (a, e), (a, b), (0, b),
                (0, a), (a, a)]
    if kind == "star":
        r, ri = e / 2, e / 2 * 0.48
        pts = []
        for i in range(10):
            ang = -math.pi / 2 + i * math.pi / 5
            rad = r if i % 2 == 0 else ri
            pts.append((rad * math.cos(ang), rad * math.sin(ang)))
        ys = [p[1] for p in pts]
        lo, hi = min(ys), max(ys)
        pad = (e - (hi - lo)) / 2  # centre the star vertically in the box
        return [(x + e / 2, y - lo + pad) for x, y in pts]
    if kind == "circle":
        return None
    raise ValueError(f"unknown kind {kind!r}; choose from {KINDS}")


def _tight_box(kind: str, x: int, y: int, s: int) -> tuple[int, int, int, int]:
    """The end-exclusive pixel box of ``kind`` drawn in the ``s``-box at (x, y)."""
    poly = _outline(kind, s)
    if poly is None:
        return (x, y, x + s, y + s)
    xs = [p[0] for p in poly]
    ys = [p[1] for p in poly]
    return (x + math.floor(min(xs)), y + math.floor(min(ys)),
            x + math.floor(max(xs)) + 1, y + math.floor(max(ys)) + 1)


def _free(box: tuple[int, int, int, int], taken: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + _GAP <= a0 or a1 + _GAP <= x0 or y1 + _GAP <= b0 or b1 + _GAP <= y0
               for a0, b0, a1, b1 in taken)


# ----------------------------------------------------------------------------- sampling


def sample_scene(seed: int, *, width: int = 112, height: int = 112, n_objects: int | None = None,
                 with_word: bool = False) -> Scene:
    """Draw a scene from ``seed``: a background, 1 to 6 objects (``n_objects`` forces the
    number asked for; an object that finds no free place after many tries is made small,
    then dropped, so a crowded scene can hold fewer) and, with ``with_word``, an OCR word."""
    if width < 48 or height < 48:
        raise PairforgeError(f"image size {width}x{height} is too small; use width and height >= 48")
    rng = random.Random(seed)
    background = rng.choice(list(BACKGROUNDS))
    palette = colors_for(background)
    n = n_objects if n_objects is not None else rng.randint(1, MAX_OBJECTS)
    scale = min(width, height) / 112
    taken: list[tuple[int, int, int, int]] = []

    word, word_box = None, None
    if with_word:
        word = rng.choice(OCR_WORDS)
        tw, th = _text_size(word)
        wx = rng.randint(_GAP, width - tw - _GAP)
        wy = rng.randint(_GAP, height - th - _GAP)
        word_box = (wx, wy, wx + tw, wy + th)
        taken.append(word_box)

    objects: list[Obj] = []
    for _ in range(n):
        kind, color = rng.choice(KINDS), rng.choice(palette)
        size = rng.choice(SIZES)
        for size_try in ((size, "small") if size == "large" else (size,)):
            lo, hi = SIZE_RANGE[size_try]
            s = rng.randint(round(lo * scale), round(hi * scale))
            placed = None
            for _ in range(60):
                x = rng.randint(_GAP, width - s - _GAP)
                y = rng.randint(_GAP, height - s - _GAP)
                box = _tight_box(kind, x, y, s)
                if _free(box, taken):
                    placed = (x, y, box)
                    break
            if placed:
                x, y, box = placed
                taken.append(box)
                objects.append(Obj(kind, color, size_try, *box))
                break
    return Scene(width, height, background, tuple(objects), seed, word, word_box)


# ----------------------------------------------------------------------------- rendering


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=13)


def _text_size(word: str) -> tuple[int, int]:
    x0, y0, x1, y1 = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), word, font=_font())
    return x1, y1


def _draw_object(draw: ImageDraw.ImageDraw, o: Obj) -> None:
    """Draw ``o`` so that its tight box is exactly ``o.box``."""
    rgb = COLORS[o.color]
    if o.kind == "circle":
        draw.ellipse([o.x0, o.y0, o.x1 - 1, o.y1 - 1], fill=rgb)
        return
    # Recover the drawing box from the tight box: the outline of side s, shifted.
    s = _side_for(o)
    poly = _outline(o.kind, s)
    bx0, by0, _, _ = _tight_box(o.kind, 0, 0, s)
    draw.polygon([(o.x0 - bx0 + px, o.y0 - by0 + py) for px, py in poly], fill=rgb)


def _side_for(o: Obj) -> int:
    """The box side ``s`` whose tight box for ``o.kind`` has ``o``'s width and height."""
    w, h = o.x1 - o.x0, o.y1 - o.y0
    for s in range(max(w, h), max(w, h) + 8):
        x0, y0, x1, y1 = _tight_box(o.kind, 0, 0, s)
        if (x1 - x0, y1 - y0) == (w, h):
            return s
    raise ValueError(f"object box {o.box} does not fit a {o.kind} of any side length")


def render_scene(scene: Scene) -> Image.Image:
    """The RGB image of ``scene``: textured background, flat shapes, light pixel noise."""
    rng = np.random.default_rng(scene.seed)
    w, h = scene.width, scene.height
    base = np.array(BACKGROUNDS[scene.background], dtype=np.float32)
    # Light texture: a coarse random grid, smoothly upsampled (±14 per channel, shared).
    g = int(rng.integers(3, 9))
    coarse = rng.uniform(-14, 14, size=(g, g)).astype(np.float32)
    tex = np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR))
    bg = base[None, None, :] + tex[:, :, None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw_object(draw, o)
    if scene.word and scene.word_box:
        dark_bg = sum(BACKGROUNDS[scene.background]) < 300
        draw.text(scene.word_box[:2], scene.word, font=_font(),
                  fill=(245, 245, 245) if dark_bg else (10, 10, 10))
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-6, 7, size=(h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
