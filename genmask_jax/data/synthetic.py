"""A procedural data set for the demo and the tests: 2-4 shapes on a 3 x 3 grid.

Each shape has a kind (circle, square, triangle), a color, a size (small, large) and a grid
cell (shapes never overlap). A segmentation sample refers to one shape with an expression
that only the text can resolve ("red circle", "leftmost shape", "small blue square below
the triangle"; no leading article: the prompt template supplies it, as for RefCOCO
expressions); `resolve` checks that exactly one shape matches. A generation sample captions
the whole scene ("a small red circle and a large blue square").

Splits: "train" and "val" scenes never contain the HELD_OUT (color, kind) pairs; "heldout"
targets only those pairs, named by color and kind, to test composition. "gen" holds captioned
scenes of every pair, so a held-out pair is seen (and named) in generation data alone. (As
distractors in segmentation scenes they would teach that such a shape is never the target.)
Sample i of a split depends only on (seed, split, i): generation order and subsets do not
change it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

from genmask_jax.data import records

KINDS = ("circle", "square", "triangle")
COLORS = {
  "red": (215, 40, 40),
  "green": (40, 170, 60),
  "blue": (45, 85, 225),
  "yellow": (230, 205, 35),
  "purple": (150, 60, 200),
}
SIZES = {"small": 0.09, "large": 0.15}  # Half-extent as a fraction of the image side.
HELD_OUT = (("red", "triangle"), ("green", "circle"), ("blue", "square"))
SPLITS = ("train", "val", "heldout", "gen")
GRID = 3
EXTREMES = ("leftmost", "rightmost", "topmost", "bottommost")
RELATIONS = ("to the left of", "to the right of", "above", "below")
_TYPE_WEIGHTS = {"attribute": 0.4, "extreme": 0.25, "relation": 0.35}


class Shape(NamedTuple):
  kind: str
  color: str
  size: str
  row: int
  col: int


Desc = tuple  # (size | None, color | None, kind | None): the attributes an expression names.


def _fits(shape: Shape, desc: Desc) -> bool:
  return all(
    v is None or v == a for v, a in zip(desc, (shape.size, shape.color, shape.kind), strict=True)
  )


def _rank(shape: Shape, direction: str) -> int:
  """Smallest for the shape furthest in `direction`."""
  if direction in ("leftmost", "rightmost"):
    return shape.col if direction == "leftmost" else -shape.col
  return shape.row if direction == "topmost" else -shape.row


def _related(a: Shape, b: Shape, relation: str) -> bool:
  return {
    "to the left of": a.col < b.col,
    "to the right of": a.col > b.col,
    "above": a.row < b.row,
    "below": a.row > b.row,
  }[relation]


def resolve(expression: dict, shapes: Sequence[Shape]) -> list[int]:
  """Indices of the shapes the expression refers to (an ambiguous anchor refers to none)."""
  matches = [i for i, s in enumerate(shapes) if _fits(s, expression["desc"])]
  if expression["type"] == "extreme":
    best = min((_rank(shapes[i], expression["direction"]) for i in matches), default=None)
    return [i for i in matches if _rank(shapes[i], expression["direction"]) == best]
  if expression["type"] == "relation":
    anchors = [j for j, s in enumerate(shapes) if _fits(s, expression["anchor"])]
    if len(anchors) != 1:
      return []
    anchor = shapes[anchors[0]]
    return [
      i for i in matches if i != anchors[0] and _related(shapes[i], anchor, expression["relation"])
    ]
  return matches


def _phrase(desc: Desc) -> str:
  return " ".join([w for w in desc if w is not None] + (["shape"] if desc[2] is None else []))


def render(expression: dict) -> str:
  phrase = _phrase(expression["desc"])
  if expression["type"] == "extreme":
    return f"{expression['direction']} {phrase}"
  if expression["type"] == "relation":
    return f"{phrase} {expression['relation']} the {_phrase(expression['anchor'])}"
  return phrase


def _descs(shape: Shape) -> list[Desc]:
  """Every non-empty subset of the shape's (size, color, kind)."""
  attrs = (shape.size, shape.color, shape.kind)
  return [
    tuple(a if keep else None for a, keep in zip(attrs, mask, strict=True))
    for mask in itertools.product((True, False), repeat=3)
    if any(mask)
  ]


def _candidates(kind: str, shapes: Sequence[Shape], t: int) -> list[dict]:
  target = shapes[t]
  if kind == "attribute":
    return [{"type": "attribute", "desc": d} for d in _descs(target)]
  if kind == "extreme":
    filters = [(None, None, None), (None, target.color, None), (None, None, target.kind)]
    return [{"type": "extreme", "direction": e, "desc": d} for e in EXTREMES for d in filters]
  return [
    {"type": "relation", "desc": d, "relation": r, "anchor": a}
    for d in _descs(target)
    for r in RELATIONS
    for j, other in enumerate(shapes)
    if j != t
    for a in _descs(other)
  ]


def _expression(rng: np.random.Generator, shapes: Sequence[Shape], t: int, heldout: bool):
  """A random expression that refers to shape t alone, or None if there is none."""
  kinds = list(_TYPE_WEIGHTS)
  order = rng.choice(len(kinds), size=len(kinds), replace=False, p=list(_TYPE_WEIGHTS.values()))
  for k in order:
    candidates = _candidates(kinds[k], shapes, t)
    for c in rng.permutation(len(candidates)):
      expression = candidates[c]
      named = expression["desc"][1] is not None and expression["desc"][2] is not None
      if (named or not heldout) and resolve(expression, shapes) == [t]:
        return expression
  return None


def _scene(rng: np.random.Generator) -> list[Shape]:
  cells = rng.choice(GRID * GRID, size=rng.integers(2, 5), replace=False)
  return [
    Shape(
      kind=KINDS[rng.integers(len(KINDS))],
      color=list(COLORS)[rng.integers(len(COLORS))],
      size=list(SIZES)[rng.integers(len(SIZES))],
      row=int(c // GRID),
      col=int(c % GRID),
    )
    for c in cells
  ]


def draw(
  rng: np.random.Generator, shapes: Sequence[Shape], image_size: int
) -> tuple[np.ndarray, list[np.ndarray]]:
  """RGB uint8 image and one boolean mask per shape; each shape stays inside its cell."""
  cell = image_size / GRID
  yy, xx = np.mgrid[:image_size, :image_size] + 0.5
  image = np.empty((image_size, image_size, 3), np.uint8)
  image[:] = rng.integers(20, 80)  # A dark grey background, darker than every color.
  masks = []
  for s in shapes:
    r = SIZES[s.size] * image_size
    slack = max(cell / 2 - r - 1, 0)
    cx, cy = (np.array([s.col, s.row]) + 0.5) * cell + rng.uniform(-slack, slack, 2)
    dx, dy = xx - cx, yy - cy
    if s.kind == "circle":
      mask = dx**2 + dy**2 <= r**2
    elif s.kind == "square":
      mask = (np.abs(dx) <= 0.9 * r) & (np.abs(dy) <= 0.9 * r)
    else:  # An upright triangle: apex at the top, base at the bottom.
      mask = (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)
    image[mask] = COLORS[s.color]
    masks.append(mask)
  return image, masks


def _source(split: str, index: int, shapes: Sequence[Shape], **extra) -> dict:
  return dict(
    dataset="synthetic", split=split, index=index, shapes=[list(s) for s in shapes], **extra
  )


def segmentation_sample(split: str, index: int, *, seed: int = 0, image_size: int = 64):
  """Sample `index` of a segmentation split ("train", "val" or "heldout")."""
  if split not in SPLITS[:3]:
    raise ValueError(f"segmentation split {split!r} is not one of {SPLITS[:3]}")
  rng = np.random.default_rng([seed, SPLITS.index(split), index])
  while True:  # Redraw the rare scenes where the target cannot be singled out.
    shapes = _scene(rng)
    t = int(rng.integers(len(shapes)))
    if split == "heldout":
      color, kind = HELD_OUT[rng.integers(len(HELD_OUT))]
      shapes[t] = shapes[t]._replace(color=color, kind=kind)
    elif any((s.color, s.kind) in HELD_OUT for s in shapes):
      continue
    expression = _expression(rng, shapes, t, heldout=split == "heldout")
    if expression is not None:
      break
  image, masks = draw(rng, shapes, image_size)
  return records.make_sample(
    sample_id=f"synthetic/{split}/{index:07d}",
    task="segmentation",
    image=image,
    mask=masks[t].astype(np.uint8),
    text=render(expression),
    source=_source(split, index, shapes, target=t, expression=expression),
  )


def caption(shapes: Sequence[Shape]) -> str:
  """ "a small red circle, a large blue square and a green triangle", in reading order."""
  words = [f"a {s.size} {s.color} {s.kind}" for s in sorted(shapes, key=lambda s: (s.row, s.col))]
  return ", ".join(words[:-1]) + " and " + words[-1]


def generation_sample(index: int, *, seed: int = 0, image_size: int = 64) -> records.Sample:
  rng = np.random.default_rng([seed, SPLITS.index("gen"), index])
  shapes = _scene(rng)
  image, _ = draw(rng, shapes, image_size)
  return records.make_sample(
    sample_id=f"synthetic/gen/{index:07d}",
    task="generation",
    image=image,
    text=caption(shapes),
    source=_source("gen", index, shapes),
  )


def samples(
  split: str, num: int, *, seed: int = 0, image_size: int = 64
) -> Iterator[records.Sample]:
  """The first `num` samples of a split."""
  for i in range(num):
    if split == "gen":
      yield generation_sample(i, seed=seed, image_size=image_size)
    else:
      yield segmentation_sample(split, i, seed=seed, image_size=image_size)
