"""Procedural, fully offline visual world of the ``mini`` suite.

Every image is a 32x32 RGB scene with the same ingredients:

* a background texture (plain / striped / checkered / dotted) in two random grey-ish tones;
* one handwritten digit (a scikit-learn ``load_digits`` 8x8 bitmap upscaled to 16x16), painted in
  one colour and placed in one quadrant of the image;
* a group of 1-4 identical shapes (circle / square / triangle / cross), all of one colour, one size
  and one fill style (filled / outlined), scattered over the 8x8 cells outside the digit's quadrant;
* mild colour jitter and Gaussian pixel noise.

Each task asks about one attribute of that scene (or a pair of them: ``color_shape``, ``fill_shape``,
``size_color``) and randomises all the others, so the tasks share their world but disagree on which
features matter: fine-tuning the image tower on one of them overwrites what the others need (which
is what continual learning and merging are about). Each task also has its own image domain, a
corruption of the clean scene (blur, desaturation, noise, low contrast, colour cast; ``corrupt``):
the tiny CLIP was pre-trained on clean scenes, so zero-shot accuracy is above chance but far from
what a fine-tuned expert reaches, as for a real CLIP on a specialised dataset. (The digit, the
background texture and the digit's position stay in every scene as distractors. They are not asked
about: the shipped pre-training never learnt them, its text embeddings of their class names
coincide, so no zero-shot head could be built for them.)

``make_split`` draws balanced, deterministic task splits; ``pretrain_corpus`` draws captioned scenes
from disjoint random streams (and a disjoint pool of digit bitmaps) for CLIP-style pre-training.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 32
_SS = 4  # supersampling factor for drawing shapes
_CELL = 8  # shapes live on an 8x8-pixel cell grid (4x4 cells)

SHAPES = ("circle", "square", "triangle", "cross")
_SHAPE_PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
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


@dataclass(frozen=True)
class MiniTaskSpec:
    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]


# Zero-shot-style prompts about one scene attribute each (``name`` is the attribute). A third of the
# pre-training captions are drawn from these, so they are part of the shipped corpus: never edit them.
ATTRIBUTE_PROMPTS: list[MiniTaskSpec] = [
    MiniTaskSpec(
        "shape",
        SHAPES,
        ("a photo of a {}.", "an image showing a {}.", "a {} shape.", "a picture with a {} in it."),
    ),
    MiniTaskSpec(
        "color",
        COLORS,
        ("a photo of {} shapes.", "an image showing {} objects.", "{} shapes.", "the shapes are {}."),
    ),
    MiniTaskSpec(
        "digit",
        DIGITS,
        ("a photo of the digit {}.", "an image showing the number {}.", "the digit {}.", "a handwritten {}."),
    ),
    MiniTaskSpec(
        "count",
        COUNTS,
        ("a photo of {} shapes.", "an image showing {} objects.", "{} shapes.", "there are {} shapes."),
    ),
    MiniTaskSpec(
        "texture",
        TEXTURES,
        (
            "a photo of a {} background.",
            "an image with a {} background.",
            "shapes on a {} background.",
            "the background is {}.",
        ),
    ),
    MiniTaskSpec(
        "position",
        POSITIONS,
        ("a photo of a digit in the {}.", "an image with the number in the {}.", "a digit at the {}.", "the digit is in the {}."),
    ),
    MiniTaskSpec(
        "size",
        SIZES,
        ("a photo of {} shapes.", "an image showing {} objects.", "{} shapes.", "the shapes are {}."),
    ),
    MiniTaskSpec(
        "fill",
        FILLS,
        ("a photo of {} shapes.", "an image showing {} objects.", "{} shapes.", "the shapes are {}."),
    ),
    MiniTaskSpec(
        "digit_color",
        COLORS,
        ("a photo of a {} digit.", "an image showing a {} number.", "a {} digit.", "the digit is {}."),
    ),
]
ATTRIBUTE_VALUES = {
    "shape": SHAPES, "color": COLORS, "digit": DIGITS, "count": COUNTS, "texture": TEXTURES,
    "position": POSITIONS, "size": SIZES, "fill": FILLS, "digit_color": COLORS,
}
CORRUPTIONS = ("blur", "desaturate", "noise", "contrast", "color_cast")


@dataclass(frozen=True)
class MiniTask:
    """One task of the suite: which scene attribute(s) it asks about and its image domain.

    The label is the joint index over ``attributes`` (row-major; class names in the same order).
    Every task draws its images through its own ``corruption`` at ``severity`` (see ``corrupt``):
    pre-training saw clean scenes only, so each task is a shifted domain, the way a real benchmark's
    dataset differs from the web images CLIP was trained on. That is what leaves room between
    zero-shot accuracy and the accuracy of a fine-tuned expert.
    """

    name: str
    attributes: tuple[str, ...]
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    corruption: str
    severity: float

    @property
    def label_sizes(self) -> tuple[int, ...]:
        return tuple(len(ATTRIBUTE_VALUES[a]) for a in self.attributes)


def _single(name: str, corruption: str, severity: float) -> MiniTask:
    prompt = next(p for p in ATTRIBUTE_PROMPTS if p.name == name)
    return MiniTask(name, (name,), prompt.classnames, prompt.templates, corruption, severity)


# Severities were chosen on the shipped weights so that zero-shot accuracy stays well above chance
# and a 100-step expert gains 15-50 points (measured figures: README, "The mini suite").
TASKS: list[MiniTask] = [
    _single("shape", "blur", 1.0),
    _single("color", "desaturate", 0.25),
    _single("count", "noise", 20.0),
    _single("size", "contrast", 0.25),
    _single("fill", "noise", 30.0),
    _single("digit_color", "color_cast", 100.0),
    MiniTask(
        "color_shape", ("color", "shape"),
        tuple(f"{c} {s}" for c in COLORS for s in SHAPES),
        ("a photo of a {}.", "an image showing a {}.", "a {} shape.", "a picture with a {} in it."),
        "contrast", 0.4,
    ),
    MiniTask(
        "fill_shape", ("fill", "shape"),
        tuple(f"{f} {_SHAPE_PLURALS[s]}" for f in FILLS for s in SHAPES),
        ("a photo of {}.", "an image showing {}.", "{}.", "the shapes are {}."),
        "blur", 1.0,
    ),
    MiniTask(
        "size_color", ("size", "color"),
        tuple(f"{z} {c}" for z in SIZES for c in COLORS),
        ("a photo of {} shapes.", "an image showing {} objects.", "{} shapes.", "the shapes are {}."),
        "desaturate", 0.35,
    ),
]
TASKS_BY_NAME = {t.name: t for t in TASKS}
SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------------------------------
# Randomness and the digit pools
# --------------------------------------------------------------------------------------------------


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """A generator seeded from (seed, keys) through a stable hash (never Python's ``hash``)."""
    words = [int(seed) & 0xFFFFFFFF] + [zlib.crc32(k.encode("utf-8")) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


@lru_cache(maxsize=1)
def _digit_pools() -> dict[str, dict[int, np.ndarray]]:
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


def _sample_scene(rng: np.random.Generator, fixed: dict[str, int] | None = None) -> dict[str, int]:
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


def _render(rng: np.random.Generator, scene: dict[str, int], pool: dict[int, np.ndarray]) -> np.ndarray:
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


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


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


def make_split(task_name: str, split: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Balanced, deterministic split of one task: (uint8 images N x 32 x 32 x 3, int64 labels N).

    Labels cycle through the classes (then get shuffled), so every class appears n // C or
    n // C + 1 times. Different splits use different random streams and disjoint digit pools.
    """
    if task_name not in TASKS_BY_NAME:
        raise KeyError(f"unknown mini task {task_name!r}; known: {sorted(TASKS_BY_NAME)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    spec = TASKS_BY_NAME[task_name]
    rng = _rng(seed, "mini-task", task_name, split)
    pool = _digit_pools()[split]
    labels = np.arange(n, dtype=np.int64) % len(spec.classnames)
    rng.shuffle(labels)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i in range(n):
        values = np.unravel_index(int(labels[i]), spec.label_sizes)
        scene = _sample_scene(rng, {a: int(v) for a, v in zip(spec.attributes, values)})
        images[i] = corrupt(_render(rng, scene, pool), rng, spec.corruption, spec.severity)
    return images, labels


def _plural(word: str, count: int) -> str:
    if count == 1:
        return word
    return _SHAPE_PLURALS.get(word, word + "s")


ATTRIBUTES = ("shape", "color", "digit", "count", "texture", "position", "size", "fill", "digit_color")


def describe(scene: dict[str, int], rng: np.random.Generator) -> tuple[str, frozenset[str]]:
    """A caption mentioning a random subset of the scene's attributes, and the set of attributes it
    pins down (used to find every image in a batch that a caption fits)."""
    # About a third of the captions are a task prompt about one attribute (the way zero-shot asks).
    if rng.random() < 0.3:
        spec = ATTRIBUTE_PROMPTS[int(rng.integers(len(ATTRIBUTE_PROMPTS)))]
        attribute = spec.name
        text = spec.templates[int(rng.integers(len(spec.templates)))].format(spec.classnames[scene[attribute]])
        return text, frozenset((attribute,))

    mentioned: set[str] = set()
    count = scene["count"] + 1
    parts: list[str] = []
    # objects phrase: [count] [size] [colour] [fill] noun
    if rng.random() < 0.8:
        words = []
        if rng.random() < 0.5:
            words.append(COUNTS[scene["count"]])
            mentioned.add("count")
        elif count == 1:
            words.append("a")
            mentioned.add("count")
        elif rng.random() < 0.3:
            words.append("some")
        for attribute, names, p in (("size", SIZES, 0.4), ("color", COLORS, 0.5), ("fill", FILLS, 0.35)):
            if rng.random() < p:
                words.append(names[scene[attribute]])
                mentioned.add(attribute)
        if rng.random() < 0.6:
            noun = _plural(SHAPES[scene["shape"]], count)
            mentioned.add("shape")
        else:
            noun = _plural("shape" if rng.random() < 0.5 else "object", count)
        parts.append(" ".join(words + [noun]))
    # digit phrase: a [colour] digit [name] [in the position]
    if rng.random() < 0.6:
        dcol = ""
        if rng.random() < 0.5:
            dcol = COLORS[scene["digit_color"]] + " "
            mentioned.add("digit_color")
        digit = DIGITS[scene["digit"]]
        r = rng.random()
        if r < 0.4:
            phrase = f"a {dcol}digit {digit}"
        elif r < 0.7:
            phrase = f"the {dcol}number {digit}"
        elif r < 0.85:
            phrase = f"a {dcol}{digit}"
        else:
            phrase = f"a {dcol}digit"
        if r < 0.85:
            mentioned.add("digit")
        if rng.random() < 0.45:
            phrase += (" in the " if rng.random() < 0.5 else " at the ") + POSITIONS[scene["position"]]
            mentioned.add("position")
        parts.append(phrase)
    texture = TEXTURES[scene["texture"]]
    if len(parts) > 1 and rng.random() < 0.5:
        parts.reverse()
    text = " and ".join(parts)
    if not parts:
        text = f"a {texture} background"
        mentioned.add("texture")
    elif rng.random() < 0.4:
        text += f" {'on' if rng.random() < 0.5 else 'with'} a {texture} background"
        mentioned.add("texture")
    prefix = ("a photo of ", "an image of ", "a picture of ", "")[int(rng.integers(4))]
    return f"{prefix}{text}.", frozenset(mentioned)


def caption_for(scene: dict[str, int], rng: np.random.Generator) -> str:
    """A caption that mentions a random subset of the scene's attributes, in varied phrasing."""
    return describe(scene, rng)[0]


def pretrain_corpus_with_meta(n: int, seed: int) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """``pretrain_corpus`` plus, per item, the scene's attribute indices (N x 9 int64, columns in
    ``ATTRIBUTES`` order) and which of them the caption mentions (N x 9 bool)."""
    rng = _rng(seed, "mini-pretrain")
    pool = _digit_pools()["pretrain"]
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    scenes = np.empty((n, len(ATTRIBUTES)), np.int64)
    mentions = np.zeros((n, len(ATTRIBUTES)), bool)
    captions: list[str] = []
    for i in range(n):
        scene = _sample_scene(rng)
        images[i] = _render(rng, scene, pool)
        text, mentioned = describe(scene, rng)
        captions.append(text)
        scenes[i] = [scene[a] for a in ATTRIBUTES]
        mentions[i] = [a in mentioned for a in ATTRIBUTES]
    return images, captions, scenes, mentions


def pretrain_corpus(n: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``n`` captioned scenes for contrastive pre-training (uint8 N x 32 x 32 x 3, captions).

    Drawn from their own random stream and their own pool of digit bitmaps, so no task split
    shares an image (or a digit bitmap) with it.
    """
    images, captions, _, _ = pretrain_corpus_with_meta(n, seed)
    return images, captions
