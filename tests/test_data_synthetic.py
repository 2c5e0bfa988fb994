"""The synthetic shapes set: reproducible, and every expression singles out its target.

Expressions are checked with a parser and evaluator written here, independent of the
generator's own `resolve`.
"""

import re

import numpy as np
import pytest

from genmask_jax.data import records, synthetic

KIND_WORDS = set(synthetic.KINDS)
RELATION_RE = r"to the left of|to the right of|above|below"


def _fits(shape, phrase):
  kind, color, size, _, _ = shape
  words = phrase.split()
  if words[-1] != "shape" and words[-1] != kind:
    return False
  return all(w in (color, size) for w in words[:-1])


def _referents(text, shapes):
  """Indices of the shapes the text refers to, by this test's own reading of the grammar."""
  if m := re.fullmatch(r"(leftmost|rightmost|topmost|bottommost) (.+)", text):
    axis, sign = {"leftmost": (4, 1), "rightmost": (4, -1), "topmost": (3, 1)}.get(m[1], (3, -1))
    found = [i for i, s in enumerate(shapes) if _fits(s, m[2])]
    best = min(sign * shapes[i][axis] for i in found)
    return [i for i in found if sign * shapes[i][axis] == best]
  if m := re.fullmatch(rf"(.+?) ({RELATION_RE}) the (.+)", text):
    (anchor,) = [a for a, s in enumerate(shapes) if _fits(s, m[3])]  # Must be unique.
    (ar, ac) = shapes[anchor][3:]
    ok = {
      "to the left of": lambda r, c: c < ac,
      "to the right of": lambda r, c: c > ac,
      "above": lambda r, c: r < ar,
      "below": lambda r, c: r > ar,
    }[m[2]]
    return [i for i, s in enumerate(shapes) if i != anchor and _fits(s, m[1]) and ok(*s[3:])]
  return [i for i, s in enumerate(shapes) if _fits(s, text)]


@pytest.fixture(scope="module")
def samples():
  return {
    split: list(synthetic.samples(split, n, seed=5))
    for split, n in [("train", 600), ("val", 100), ("heldout", 200), ("gen", 100)]
  }


def test_reproducible_and_order_free(samples):
  again = list(synthetic.samples("train", 40, seed=5))
  assert again == samples["train"][:40]
  assert synthetic.segmentation_sample("train", 33, seed=5) == samples["train"][33]
  other = list(synthetic.samples("train", 40, seed=6))
  assert sum(a["image"] != b["image"] for a, b in zip(again, other, strict=True)) > 35
  ids = [s["id"] for split in samples.values() for s in split]
  assert len(set(ids)) == len(ids)


def test_expressions_single_out_the_target(samples):
  types = set()
  for split in ("train", "val", "heldout"):
    for s in samples[split]:
      shapes, target = s["source"]["shapes"], s["source"]["target"]
      assert 2 <= len(shapes) <= 4
      assert _referents(s["text"], shapes) == [target], (s["text"], shapes, target)
      types.add(s["source"]["expression"]["type"])
  assert types == {"attribute", "extreme", "relation"}


def test_masks_cover_the_target_shape(samples):
  for s in samples["train"][:100]:
    image, mask = records.decode_image(s), records.decode_mask(s)
    kind, color, size, row, col = s["source"]["shapes"][s["source"]["target"]]
    assert (image[mask == 1] == synthetic.COLORS[color]).all()
    ys, xs = np.nonzero(mask)
    cell = 64 / synthetic.GRID
    assert row * cell <= ys.min() and ys.max() < (row + 1) * cell
    assert col * cell <= xs.min() and xs.max() < (col + 1) * cell
    r2 = (synthetic.SIZES[size] * 64) ** 2
    ratio = {"triangle": 2.0, "square": 4 * 0.9**2, "circle": np.pi}[kind]
    assert 0.75 * ratio * r2 < mask.sum() < 1.3 * ratio * r2
  assert set(np.unique(records.decode_mask(samples["train"][0]))) == {0, 1}


def test_held_out_pairs_are_segmented_only_in_heldout(samples):
  held = set(synthetic.HELD_OUT)

  def target(s):
    kind, color, *_ = s["source"]["shapes"][s["source"]["target"]]
    return color, kind

  def pairs(split):
    return {(sh[1], sh[0]) for s in samples[split] for sh in s["source"]["shapes"]}

  assert not held & (pairs("train") | pairs("val"))
  assert all(target(s) in held for s in samples["heldout"])
  for s in samples["heldout"]:
    color, kind = target(s)
    assert re.match(rf"(small |large )?{color} {kind}\b", s["text"]), s["text"]
  # Generation scenes show (and their captions name) the held-out pairs.
  assert held <= pairs("gen")


def test_captions_list_every_shape(samples):
  for s in samples["gen"]:
    shapes = sorted(s["source"]["shapes"], key=lambda sh: (sh[3], sh[4]))
    parts = [f"a {size} {color} {kind}" for kind, color, size, _, _ in shapes]
    assert s["text"] == ", ".join(parts[:-1]) + " and " + parts[-1]
    assert s["task"] == "generation" and s["mask"] is None
  assert samples["gen"][0]["text"].count(" and ") == 1
