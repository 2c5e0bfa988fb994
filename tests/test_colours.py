import numpy as np

from genmask_jax.data import records, synthetic
from genmask_jax.evaluation import colours

PALETTE = synthetic.COLORS


def test_real_scenes_show_exactly_the_named_colours():
  samples = list(synthetic.samples("gen", 50, image_size=64))
  images = [records.decode_image(s) for s in samples]
  captions = [s["text"] for s in samples]
  assert colours.colour_scores(images, captions, PALETTE) == {"recall": 1.0, "precision": 1.0}


def test_a_caption_against_the_wrong_scene_or_a_blank_scores_low():
  samples = list(synthetic.samples("gen", 50, image_size=64))
  images = [records.decode_image(s) for s in samples]
  shifted = [s["text"] for s in samples[1:] + samples[:1]]  # Each image with another's caption.
  scores = colours.colour_scores(images, shifted, PALETTE)
  assert scores["recall"] < 0.8 and scores["precision"] < 0.8, scores
  blank = [np.full((64, 64, 3), 50, np.uint8)] * len(samples)
  assert colours.colour_scores(blank, shifted, PALETTE) == {"recall": 0.0, "precision": 0.0}


def test_present_colours_thresholds():
  image = np.full((100, 100, 3), 40, np.uint8)
  image[:10, :10] = (200, 50, 50)  # 1% of the image, within the tolerance of red.
  image[50, :40] = synthetic.COLORS["blue"]  # 0.4%: below min_fraction.
  assert colours.present_colours(image, PALETTE) == {"red"}
  assert colours.present_colours(image, PALETTE, min_fraction=0.003) == {"red", "blue"}
  assert colours.present_colours(image, PALETTE, tolerance=10) == set()  # Red is 20.6 away.
  assert colours.named_colours("A small Red circle and a large red square.", PALETTE) == {"red"}
