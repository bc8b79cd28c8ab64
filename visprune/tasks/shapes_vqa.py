"""`shapes-vqa`: a procedural visual-QA task whose answers live in a few image patches.

A 336x336 scene holds 1-4 small objects (shape, colour, size) in distinct cells of a 4x4 grid, on a plain or a
low-contrast textured grey background, so most of the 576 patches carry nothing an answer needs. Each sample asks
one question with a one-word answer:

| type | question | answers |
|---|---|---|
| colour | What color is the {shape}? | a colour (the shape is unique in the scene) |
| shape | What shape is the {colour} object? | a shape (the colour is unique) |
| count | How many {colour} objects are there? | zero, one, two, three |
| exists | Is there a {colour} {shape}? | yes, no (balanced) |
| side | Which side is the {shape} on? | left, right (unique shape, grid columns 0-1 vs 2-3) |

Everything is a function of (split, index): a sample's generator is seeded from both, and the three splits draw
from disjoint seed ranges, so train, calibration and test never share a generator stream.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

TASK_VERSION = 1  # bump when generation changes: cached sets and recorded accuracies carry it
SIZE = 336
GRID = 4
CELL = SIZE // GRID
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
          "purple": (150, 60, 190)}
SHAPES = ("circle", "square", "triangle")
RADIUS = {"small": 20, "large": 30}
QUESTION_TYPES = ("colour", "shape", "count", "exists", "side")
COUNT_WORDS = ("zero", "one", "two", "three")
SPLIT_SEEDS = {"train": 0, "calibration": 1_000_000_000, "test": 2_000_000_000}


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]  # (row, column) in the 4x4 grid
    centre: tuple[int, int]  # (x, y) in pixels


@dataclass(frozen=True)
class ShapesSample:
    split: str
    index: int
    objects: tuple[SceneObject, ...]
    background: str  # "plain" | "stripes" | "checks" | "noise"
    background_seed: int
    question_type: str
    question: str
    answer: str

    @property
    def id(self) -> str:
        return f"{self.split}-{self.index}"

    def image(self):
        return render_scene(self.objects, self.background, self.background_seed)


def make_sample(split: str, index: int) -> ShapesSample:
    """The `index`-th sample of `split` (deterministic)."""
    rng = random.Random(SPLIT_SEEDS[split] + index)
    question_type = QUESTION_TYPES[index % len(QUESTION_TYPES)]  # types balanced in every split
    while True:
        objects = _random_objects(rng)
        asked = _ask(question_type, objects, rng)
        if asked:
            background = rng.choice(("plain", "stripes", "checks", "noise"))
            return ShapesSample(split, index, objects, background, rng.randrange(2**31), question_type, *asked)


def scene_questions(sample: ShapesSample, limit: int = 16) -> list[tuple[str, str]]:
    """Up to `limit` (question, answer) pairs about the sample's scene: its own first, then a seeded shuffle of
    the others it can pose (each colour counted, each object's existence and a near miss, each unique shape's
    colour and side, each unique colour's shape). Training asks them all of one image: many answers per image
    encoded once."""
    rng = random.Random(f"{sample.split}-{sample.index}-more")
    pairs = [p for p in dict.fromkeys(_all_questions(sample.objects, rng)) if p != (sample.question, sample.answer)]
    rng.shuffle(pairs)
    return [(sample.question, sample.answer), *pairs[:limit - 1]]


def _all_questions(objects: tuple[SceneObject, ...], rng: random.Random) -> list[tuple[str, str]]:
    present = {(o.colour, o.shape) for o in objects}
    pairs = [(f"How many {c} objects are there?", COUNT_WORDS[n]) for c in COLORS
             if (n := sum(o.colour == c for o in objects)) < len(COUNT_WORDS)]
    for colour, shape in sorted(present):
        pairs.append((f"Is there a {colour} {shape}?", "yes"))
        near_misses = [m for m in [(c, shape) for c in COLORS] + [(colour, s) for s in SHAPES] if m not in present]
        pairs.append(("Is there a %s %s?" % rng.choice(near_misses), "no"))  # one attribute off: yes/no balanced
    for o in objects:
        if sum(p.shape == o.shape for p in objects) == 1:
            pairs.append((f"What color is the {o.shape}?", o.colour))
            pairs.append((f"Which side is the {o.shape} on?", "left" if o.cell[1] < GRID // 2 else "right"))
        if sum(p.colour == o.colour for p in objects) == 1:
            pairs.append((f"What shape is the {o.colour} object?", o.shape))
    return pairs


def make_split(split: str, count: int, start: int = 0) -> list[ShapesSample]:
    return [make_sample(split, i) for i in range(start, start + count)]


def _random_objects(rng: random.Random) -> tuple[SceneObject, ...]:
    cells = rng.sample([(r, c) for r in range(GRID) for c in range(GRID)], rng.randint(1, 4))
    objects = []
    for row, column in cells:
        size = rng.choice(tuple(RADIUS))
        slack = CELL // 2 - RADIUS[size] - 2
        centre = (column * CELL + CELL // 2 + rng.randint(-slack, slack), row * CELL + CELL // 2 + rng.randint(-slack, slack))
        objects.append(SceneObject(rng.choice(SHAPES), rng.choice(tuple(COLORS)), size, (row, column), centre))
    return tuple(objects)


def _ask(question_type: str, objects: tuple[SceneObject, ...], rng: random.Random) -> tuple[str, str] | None:
    """(question, answer) of the given type about `objects`, or None if this scene cannot pose it."""
    unique_shapes = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
    unique_colours = [o for o in objects if sum(p.colour == o.colour for p in objects) == 1]
    if question_type == "colour" and unique_shapes:
        target = rng.choice(unique_shapes)
        return f"What color is the {target.shape}?", target.colour
    if question_type == "shape" and unique_colours:
        target = rng.choice(unique_colours)
        return f"What shape is the {target.colour} object?", target.shape
    if question_type == "count":
        colour = rng.choice(tuple(COLORS))
        count = sum(o.colour == colour for o in objects)
        return (f"How many {colour} objects are there?", COUNT_WORDS[count]) if count < len(COUNT_WORDS) else None
    if question_type == "exists":
        if rng.random() < 0.5:
            target = rng.choice(objects)
            return f"Is there a {target.colour} {target.shape}?", "yes"
        colour, shape = rng.choice(tuple(COLORS)), rng.choice(SHAPES)
        present = any(o.colour == colour and o.shape == shape for o in objects)
        return None if present else (f"Is there a {colour} {shape}?", "no")
    if question_type == "side" and unique_shapes:
        target = rng.choice(unique_shapes)
        return f"Which side is the {target.shape} on?", "left" if target.cell[1] < GRID // 2 else "right"
    return None


def render_scene(objects: tuple[SceneObject, ...], background: str, seed: int):
    """The scene as a 336x336 RGB PIL image."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(_background(background, seed))
    draw = ImageDraw.Draw(image)
    for o in objects:
        _draw_object(draw, o, COLORS[o.colour])
    return image


def patch_labels(sample: ShapesSample, patch: int = 14, min_cover: float = 0.15) -> dict[str, np.ndarray]:
    """Per-patch [SIZE/patch, SIZE/patch] int64 labels of what each patch shows, 0 for background:
    "colour" (1-5 in COLORS order), "shape" (1-3 in SHAPES order), "side" (1 left, 2 right), "object" (colour and
    shape together, 1-15) and "centre" (the colour, only on the patch holding an object's centre). A patch
    belongs to the object covering at least `min_cover` of it. A dense training signal for the vision tower (many
    labels per image instead of a few answers); evaluation never uses it."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (SIZE, SIZE), 0)
    draw = ImageDraw.Draw(mask)
    for number, o in enumerate(sample.objects, start=1):
        _draw_object(draw, o, number)
    grid = SIZE // patch
    ids = np.asarray(mask).reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
    owner = np.zeros((grid, grid), dtype=np.int64)
    for number in range(1, len(sample.objects) + 1):
        owner[(ids == number).mean(-1) >= min_cover] = number
    table = np.zeros((len(sample.objects) + 1, 4), dtype=np.int64)
    for number, o in enumerate(sample.objects, start=1):
        colour, shape = list(COLORS).index(o.colour), SHAPES.index(o.shape)
        table[number] = colour + 1, shape + 1, 1 if o.cell[1] < GRID // 2 else 2, colour * len(SHAPES) + shape + 1
    labels = {name: table[owner, k] for k, name in enumerate(("colour", "shape", "side", "object"))}
    labels["centre"] = np.zeros((grid, grid), dtype=np.int64)
    for o in sample.objects:
        labels["centre"][o.centre[1] // patch, o.centre[0] // patch] = list(COLORS).index(o.colour) + 1
    return labels


def _draw_object(draw, o: SceneObject, fill) -> None:
    x, y, r = o.centre[0], o.centre[1], RADIUS[o.size]
    if o.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif o.shape == "square":
        s = int(r * 0.85)
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + int(r * 0.8)), (x + r, y + int(r * 0.8))], fill=fill)


def _background(kind: str, seed: int) -> np.ndarray:
    """[336, 336, 3] uint8 greys: plain, or a low-contrast texture with no object colour in it."""
    rng = np.random.default_rng(seed)
    base = int(rng.integers(150, 230))
    grey = np.full((SIZE, SIZE), base, dtype=np.int16)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    period = int(rng.integers(8, 40))
    if kind == "stripes":
        grey += np.where((xx + yy * int(rng.integers(0, 2))) // period % 2 == 0, 18, -18).astype(np.int16)
    elif kind == "checks":
        grey += np.where((xx // period + yy // period) % 2 == 0, 15, -15).astype(np.int16)
    elif kind == "noise":
        grey += rng.integers(-20, 21, size=(SIZE, SIZE)).astype(np.int16)
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def accuracy_by_type(samples: list[ShapesSample], answers: list[str]) -> dict[str, Any]:
    """Exact-match accuracy (first word, lower case) overall and per question type, each with its 95 % Wilson
    interval (`ci95`, [low, high]) so a reader can tell which gaps between two rows are real."""
    correct = [normalize_answer(a) == s.answer for s, a in zip(samples, answers)]
    per_type = {t: [c for c, s in zip(correct, samples) if s.question_type == t] for t in QUESTION_TYPES}
    return {"overall": float(np.mean(correct)), "n": len(correct), "ci95": wilson_interval(sum(correct), len(correct)),
            "per_type": {t: {"accuracy": float(np.mean(v)), "n": len(v), "ci95": wilson_interval(sum(v), len(v))}
                         for t, v in per_type.items() if v}}


def wilson_interval(hits: int, n: int, z: float = 1.959964) -> list[float]:
    """The 95 % Wilson score interval of a proportion hits/n, [low, high] rounded to 4 places. Unlike the normal
    approximation it stays inside [0, 1] and is honest at 0 % and 100 %."""
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def normalize_answer(text: str) -> str:
    words = text.strip().lower().replace(".", " ").split()
    return words[0] if words else ""
