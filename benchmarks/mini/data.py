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

The tasks and ``make_split`` (balanced, deterministic task splits) live here; the scenes (drawing,
corruptions) in ``benchmarks.mini.scenes``; captions and ``pretrain_corpus`` (captioned scenes from
disjoint random streams and a disjoint pool of digit bitmaps, for CLIP-style pre-training) in
``benchmarks.mini.captions``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenes import (ATTRIBUTE_VALUES, COLORS, CORRUPTIONS, COUNTS, DIGITS, FILLS, IMAGE_SIZE,  # noqa: F401
                     POSITIONS, SHAPE_PLURALS, SHAPES, SIZES, TEXTURES, corrupt, digit_pools, render, rng_for,
                     sample_scene)



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
        tuple(f"{f} {SHAPE_PLURALS[s]}" for f in FILLS for s in SHAPES),
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
    rng = rng_for(seed, "mini-task", task_name, split)
    pool = digit_pools()[split]
    labels = np.arange(n, dtype=np.int64) % len(spec.classnames)
    rng.shuffle(labels)
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    for i in range(n):
        values = np.unravel_index(int(labels[i]), spec.label_sizes)
        scene = sample_scene(rng, {a: int(v) for a, v in zip(spec.attributes, values)})
        images[i] = corrupt(render(rng, scene, pool), rng, spec.corruption, spec.severity)
    return images, labels
