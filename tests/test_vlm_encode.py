"""The tiny Qwen2.5-VL checkpoint and the prompt encoding (genmask_jax/vlm)."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from genmask_jax.vlm import encode, prompts, tiny_qwen


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
  path = tiny_qwen.save_tiny_qwen(str(tmp_path_factory.mktemp("tiny_qwen")), seed=0)
  return (path, *encode.load_vlm(path))


def png_bytes(seed: int, size: int = 56) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def test_tiny_checkpoint_is_seeded(vlm, tmp_path):
  path, model, processor = vlm
  again = tiny_qwen.save_tiny_qwen(str(tmp_path / "again"), seed=0)
  for name in ("model.safetensors", "tokenizer.json", "config.json"):
    with open(os.path.join(path, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
      assert a.read() == b.read(), name
  assert model.config.text_config.hidden_size == 64
  assert processor.tokenizer.eos_token == "<|im_end|>"


def test_synthetic_set_words_are_whole_tokens(vlm):
  """Like a real Qwen vocabulary, the tiny one holds the shapes set's words as single tokens."""
  _, _, processor = vlm
  text = (
    "the small green circle to the left of the purple square and a large triangle below the topmost"
  )
  ids = processor.tokenizer(" " + text, add_special_tokens=False)["input_ids"]
  assert [processor.tokenizer.decode([i]) for i in ids] == [f" {w}" for w in text.split()]


def test_chat_prefix_is_the_system_turn_and_user_header(vlm):
  _, _, processor = vlm
  prefix = prompts.chat_prefix_ids(processor.tokenizer)
  assert processor.tokenizer.decode(prefix) == (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
  )


def test_segmentation_features_keep_image_instruction_and_assistant_header(vlm):
  _, model, processor = vlm
  tokenizer = processor.tokenizer
  image = Image.open(io.BytesIO(png_bytes(0)))
  [features] = encode.encode_prompts(
    model, processor, [encode.Prompt(prompts.segmentation_messages("red cat"), image)]
  )
  n_text = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])
  # <|vision_start|> + 4 image tokens (56x56, 14-px patches, 2x2 merge) + <|vision_end|>.
  expected = 6 + n_text("Please segment the red cat in the image.")
  expected += n_text("<|im_end|>\n<|im_start|>assistant\n")
  assert features.shape == (expected, 64) and features.dtype == np.float32
  assert np.all(np.isfinite(features))


def test_batching_and_padding_do_not_change_features(vlm):
  _, model, processor = vlm
  batch = [
    encode.Prompt(
      prompts.segmentation_messages("blue car on the left"), Image.open(io.BytesIO(png_bytes(1)))
    ),
    encode.Prompt(prompts.generation_messages("A photo of a dog."), None),
    encode.Prompt(
      prompts.segmentation_messages("man"), Image.open(io.BytesIO(png_bytes(2, size=84)))
    ),
  ]
  together = encode.encode_prompts(model, processor, batch)
  assert len({f.shape[0] for f in together}) == 3  # The batch was padded.
  for prompt, batched in zip(batch, together, strict=True):
    [alone] = encode.encode_prompts(model, processor, [prompt])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_generate_text_is_greedy_and_deterministic(vlm):
  _, model, processor = vlm
  prompt = encode.Prompt(
    prompts.rewrite_messages("what can fly?"), Image.open(io.BytesIO(png_bytes(3)))
  )
  first = encode.generate_text(model, processor, [prompt], max_new_tokens=4)
  assert first == encode.generate_text(model, processor, [prompt], max_new_tokens=4)
  assert len(first) == 1 and isinstance(first[0], str)


def test_load_vlm_names_a_missing_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    encode.load_vlm(str(tmp_path / "nowhere"))
