"""Captions of mini scenes (a random subset of the scene's attributes, in varied phrasing) and the
captioned pre-training corpus, drawn from its own random stream and digit pool."""

from __future__ import annotations

import numpy as np

from .data import ATTRIBUTE_PROMPTS
from .scenes import (COLORS, COUNTS, DIGITS, FILLS, IMAGE_SIZE, POSITIONS, SHAPE_PLURALS, SHAPES, SIZES,
                     TEXTURES, digit_pools, render, rng_for, sample_scene)


def _plural(word: str, count: int) -> str:
    if count == 1:
        return word
    return SHAPE_PLURALS.get(word, word + "s")


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
    rng = rng_for(seed, "mini-pretrain")
    pool = digit_pools()["pretrain"]
    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    scenes = np.empty((n, len(ATTRIBUTES)), np.int64)
    mentions = np.zeros((n, len(ATTRIBUTES)), bool)
    captions: list[str] = []
    for i in range(n):
        scene = sample_scene(rng)
        images[i] = render(rng, scene, pool)
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
