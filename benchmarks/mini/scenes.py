"""The scenes of the ``mini`` suite: the visual world's attribute values, a stable seeded random
stream, the digit bitmap pools, drawing one 32x32 scene, and the per-task image corruptions (the
scene's ingredients are described in ``benchmarks.mini.data``)."""

from __future__ import annotations

import zlib
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 32
_SS = 4  # supersampling factor for drawing shapes
_CELL = 8  # shapes live on an 8x8-pixel cell grid (4x4 cells)

SHAPES = ("circle", "square", "triangle", "cross")
SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
_RGB = {
    "red": (215, 45, 40),
    "green": (45, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (230, 210, 45),
    "purple": (150, 60, 190),
    "orange": (240, 135, 35),
}
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
COUNTS = ("one", "two", "three", "four")
TEXTURES = ("plain", "striped", "checkered", "dotted")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
SIZES = ("small", "medium", "large")
_DIAMETERS = {"small": 4.25, "medium": 5.75, "large": 7.5}  # in output pixels
FILLS = ("filled", "outlined")
CORRUPTIONS = ("blur", "desaturate", "noise", "contrast", "color_cast")
ATTRIBUTE_VALUES = {
    "shape": SHAPES, "color": COLORS, "digit": DIGITS, "count": COUNTS, "texture": TEXTURES,
    "position": POSITIONS, "size": SIZES, "fill": FILLS, "digit_color": COLORS,
}


# --------------------------------------------------------------------------------------------------
# Randomness and the digit pools
# --------------------------------------------------------------------------------------------------


def rng_for(seed: int, *keys: str) -> np.random.Generator:
    """A generator seeded from (seed, keys) through a stable hash (never Python's ``hash``)."""
    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(k.encode("utf-8")) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


@lru_cache(maxsize=1)
def digit_pools() -> dict[str, dict[int, np.ndarray]]:
    """Disjoint pools of the 1797 bundled scikit-learn digits: pretrain / train / val / test.

    The split is fixed (independent of any seed) so task splits never share a bitmap with each other
    or with the pre-training corpus. Returns pool -> digit -> array (k, 8, 8) of floats in [0, 1].
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    labels = d.target.astype(np.int64)
    perm = np.random.default_rng(20240611).permutation(len(labels))
    bounds = {"pretrain": (0, 800), "train": (800, 1300), "val": (1300, 1500), "test": (1500, len(labels))}
    pools: dict[str, dict[int, np.ndarray]] = {}
    for name, (a, b) in bounds.items():
        idx = perm[a:b]
        pools[name] = {c: images[idx[labels[idx] == c]] for c in range(10)}
    return pools


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def sample_scene(rng: np.random.Generator, fixed: dict[str, int] | None = None) -> dict[str, int]:
    """Attribute indices of one scene; ``fixed`` pins some of them (the task's label)."""
    scene = {
        "shape": int(rng.integers(len(SHAPES))),
        "color": int(rng.integers(len(COLORS))),
        "digit": int(rng.integers(len(DIGITS))),
        "count": int(rng.integers(len(COUNTS))),
        "texture": int(rng.integers(len(TEXTURES))),
        "position": int(rng.integers(len(POSITIONS))),
        "size": int(rng.integers(len(SIZES))),
        "fill": int(rng.integers(len(FILLS))),
        "digit_color": int(rng.integers(len(COLORS))),
    }
    if fixed:
        scene.update(fixed)
    return scene


def _jitter_rgb(rng: np.random.Generator, name: str, amount: float = 22.0) -> np.ndarray:
    return np.clip(np.array(_RGB[name], np.float32) + rng.normal(0.0, amount, 3), 0, 255)


def _background(rng: np.random.Generator, texture: str) -> np.ndarray:
    s = IMAGE_SIZE
    base = rng.uniform(70, 185) + rng.normal(0, 10, 3)  # grey with a slight random tint
    sign = 1.0 if rng.random() < 0.5 else -1.0
    other = base + sign * rng.uniform(25, 45)
    img = np.empty((s, s, 3), np.float32)
    img[:] = base
    yy, xx = np.mgrid[0:s, 0:s]
    if texture == "plain":
        mask = np.zeros((s, s), bool)
    elif texture == "striped":
        period = int(rng.integers(4, 7))
        phase = int(rng.integers(period))
        coord = yy if rng.random() < 0.5 else xx
        mask = ((coord + phase) % period) < period // 2
    elif texture == "checkered":
        cell = int(rng.integers(2, 5))
        oy, ox = rng.integers(cell, size=2)
        mask = (((yy + oy) // cell + (xx + ox) // cell) % 2) == 1
    elif texture == "dotted":
        period = int(rng.integers(4, 6))
        oy, ox = rng.integers(period, size=2)
        mask = (((yy + oy) % period) == 0) & (((xx + ox) % period) == 0)
        # 2x2 dots when the period allows, so they survive the noise
        if rng.random() < 0.5:
            mask = mask | np.roll(mask, 1, 0) | np.roll(mask, 1, 1) | np.roll(np.roll(mask, 1, 0), 1, 1)
    else:  # pragma: no cover - guarded by TEXTURES
        raise ValueError(texture)
    img[mask] = other
    return img


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        h = r * 0.88
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "cross":
        a = r * 0.36
        return [
            (cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a),
            (cx + r, cy + a), (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r),
            (cx - a, cy + a), (cx - r, cy + a), (cx - r, cy - a), (cx - a, cy - a),
        ]
    return None


def _shape_layer(rng: np.random.Generator, scene: dict[str, int]) -> np.ndarray:
    """Alpha mask (32x32 float in [0, 1]) of the shape group, drawn supersampled."""
    shape = SHAPES[scene["shape"]]
    count = scene["count"] + 1
    diameter = _DIAMETERS[SIZES[scene["size"]]] * rng.uniform(0.93, 1.07)
    outlined = FILLS[scene["fill"]] == "outlined"
    quadrant = scene["position"]  # the digit's quadrant; shapes avoid it
    qy, qx = divmod(quadrant, 2)
    cells = [(cy, cx) for cy in range(4) for cx in range(4) if not (cy // 2 == qy and cx // 2 == qx)]
    chosen = rng.choice(len(cells), size=count, replace=False)
    big = IMAGE_SIZE * _SS
    layer = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(layer)
    r = diameter * _SS / 2
    width = max(1, int(round(1.0 * _SS)))
    slack = max(0.0, (_CELL - diameter) / 2 - 0.25)
    for k in chosen:
        cy, cx = cells[int(k)]
        py = (cy * _CELL + _CELL / 2 + rng.uniform(-slack, slack)) * _SS
        px = (cx * _CELL + _CELL / 2 + rng.uniform(-slack, slack)) * _SS
        poly = _shape_polygon(shape, px, py, r)
        if poly is None:  # circle
            box = [px - r, py - r, px + r, py + r]
            if outlined:
                draw.ellipse(box, outline=255, width=width)
            else:
                draw.ellipse(box, fill=255)
        elif outlined:
            draw.polygon(poly, outline=255, width=width)
        else:
            draw.polygon(poly, fill=255)
    small = layer.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small, np.float32) / 255.0


def _digit_layer(bitmap: np.ndarray, quadrant: int) -> np.ndarray:
    """Alpha mask of an 8x8 digit bitmap upscaled to 16x16 and placed in ``quadrant``."""
    up = Image.fromarray((bitmap * 255).astype(np.uint8), "L").resize((16, 16), Image.Resampling.BILINEAR)
    up = np.asarray(up, np.float32) / 255.0
    up = np.clip(up * 1.25, 0, 1)
    qy, qx = divmod(quadrant, 2)
    y0, x0 = qy * 16, qx * 16  # aligned with the 8x8 patch grid
    alpha = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    alpha[y0 : y0 + 16, x0 : x0 + 16] = up
    return alpha


def render(rng: np.random.Generator, scene: dict[str, int], pool: dict[int, np.ndarray]) -> np.ndarray:
    img = _background(rng, TEXTURES[scene["texture"]])
    bitmaps = pool[scene["digit"]]
    bitmap = bitmaps[int(rng.integers(len(bitmaps)))]
    a = _digit_layer(bitmap, scene["position"])[..., None]
    img = img * (1 - a) + _jitter_rgb(rng, COLORS[scene["digit_color"]]) * a
    a = _shape_layer(rng, scene)[..., None]
    img = img * (1 - a) + _jitter_rgb(rng, COLORS[scene["color"]]) * a
    img = img * rng.uniform(0.85, 1.15) + rng.normal(0, 8.0)  # global contrast / brightness
    img = img + rng.normal(0, 9.0, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def corrupt(image: np.ndarray, rng: np.random.Generator, kind: str, severity: float) -> np.ndarray:
    """A task's domain shift applied to one rendered uint8 scene (H x W x 3).

    blur: Gaussian blur of radius ``severity`` px; desaturate: keep ``severity`` of the colour
    (1 = unchanged, 0 = grey); noise: extra Gaussian pixel noise of std ``severity``; contrast:
    scale deviations from the image mean by ``severity``; color_cast: add a random per-image RGB
    offset, each channel uniform in [-severity, severity]."""
    x = image.astype(np.float32)
    if kind == "blur":
        x = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(severity)), np.float32)
    elif kind == "desaturate":
        grey = x.mean(axis=-1, keepdims=True)
        x = grey + (x - grey) * severity
    elif kind == "noise":
        x = x + rng.normal(0.0, severity, x.shape)
    elif kind == "contrast":
        mean = x.mean()
        x = mean + (x - mean) * severity
    elif kind == "color_cast":
        x = x + rng.uniform(-severity, severity, 3)
    else:
        raise ValueError(f"unknown corruption {kind!r}; known: {', '.join(CORRUPTIONS)}")
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)
