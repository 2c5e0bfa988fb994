"""A tiny random Qwen2.5-VL saved as a checkpoint directory, for offline tests of the VLM stage.

The directory loads like a real one: `Qwen2_5_VLForConditionalGeneration.from_pretrained(dir)`,
`AutoTokenizer.from_pretrained(dir)` and `AutoImageProcessor.from_pretrained(dir)`. The tokenizer
is a byte-level BPE trained here with `tokenizers` (the Qwen2 pre-tokenizer, special tokens and
a chat template with the Qwen2.5-VL layout), so nothing comes from the hub.

  python -m launch.tiny_qwen --out=/tmp/tiny_qwen
"""

from __future__ import annotations

import itertools

from genmask_jax.data import synthetic

QWEN_SPECIAL_TOKENS = (
  "<|endoftext|>",
  "<|im_start|>",
  "<|im_end|>",
  "<|object_ref_start|>",
  "<|object_ref_end|>",
  "<|box_start|>",
  "<|box_end|>",
  "<|quad_start|>",
  "<|quad_end|>",
  "<|vision_start|>",
  "<|vision_end|>",
  "<|vision_pad|>",
  "<|image_pad|>",
  "<|video_pad|>",
)

# The Qwen2.5-VL chat layout: a default system turn, `<|im_start|>role\n...<|im_end|>\n` turns,
# an image part rendered as `<|vision_start|><|image_pad|><|vision_end|>`.
CHAT_TEMPLATE = (
  "{% if messages[0]['role'] != 'system' %}"
  "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
  "{% if message['content'] is string %}{{ message['content'] }}"
  "{% else %}{% for part in message['content'] %}"
  "{% if part['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
  "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
  "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_COLORS = ("red", "green", "blue", "yellow", "black", "white", "brown", "gray")
_THINGS = ("cat", "dog", "person", "car", "chair", "bird", "horse", "cup", "tree", "bus", "man")
_PLACES = ("on the left", "on the right", "in the middle", "near the table", "on the grass")


def _scene_phrases() -> list[str]:
  """Phrases in the words of the synthetic shapes set, so that these words become whole tokens,
  as they are in a real Qwen vocabulary (not byte pieces that the DiT would have to reassemble:
  without them "circle" is ' c', 'ir', 'c', 'le' and ends like "triangle" and "purple")."""
  shapes = [
    f"{size} {color} {kind}"
    for size, color, kind in itertools.product(synthetic.SIZES, synthetic.COLORS, synthetic.KINDS)
  ]
  places = [*synthetic.EXTREMES, *(f"shape {r} the" for r in synthetic.RELATIONS)]
  captions = [
    f"{a}, a {b} and a {c}" for a, b, c in zip(shapes, shapes[1:], shapes[2:], strict=False)
  ]
  return [*shapes, *captions, *(f"the {p} {kind}" for p in places for kind in synthetic.KINDS)]


def _training_corpus() -> list[str]:
  phrases = [f"{c} {t} {p}" for c, t, p in itertools.product(_COLORS, _THINGS, _PLACES)]
  phrases += _scene_phrases()
  return [
    "You are a helpful assistant.",
    "Describe the object that should be segmented to answer the question.",
    *(f"Please segment the {p} in the image." for p in phrases),
    *(f"A photo of a {p}." for p in phrases),
  ]


def build_tokenizer(vocab_size: int = 512):
  """A Qwen2 byte-level BPE tokenizer trained on a small fixed corpus (deterministic)."""
  from transformers import Qwen2Tokenizer

  # An empty Qwen2Tokenizer carries the Qwen2 split regex, byte-level pre-tokenizer and decoder.
  tokenizer = Qwen2Tokenizer().train_new_from_iterator(
    [_training_corpus()],
    vocab_size=vocab_size,
    new_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]),
    show_progress=False,
  )
  tokenizer.eos_token, tokenizer.pad_token = "<|im_end|>", "<|endoftext|>"
  tokenizer.chat_template = CHAT_TEMPLATE
  return tokenizer


def _config(tokenizer, text: dict, vision: dict):
  """A Qwen2_5_VLConfig of the given sizes, wired to the tokenizer's special token ids."""
  from transformers import Qwen2_5_VLConfig

  ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
  special = dict(
    bos_token_id=ids["<|endoftext|>"],
    eos_token_id=ids["<|im_end|>"],
    pad_token_id=ids["<|endoftext|>"],
  )
  return Qwen2_5_VLConfig(
    text_config=dict(text, **special),
    vision_config=dict(
      vision, patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112
    ),
    image_token_id=ids["<|image_pad|>"],
    video_token_id=ids["<|video_pad|>"],
    vision_start_token_id=ids["<|vision_start|>"],
    vision_end_token_id=ids["<|vision_end|>"],
    **special,
  )


def tiny_config(tokenizer):
  return _config(
    tokenizer,
    text=dict(
      vocab_size=len(tokenizer),
      hidden_size=64,
      intermediate_size=128,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=2048,
      # mrope sections (temporal, height, width) sum to head_dim / 2 = 8.
      rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
    ),
    vision=dict(
      depth=2,
      hidden_size=32,
      intermediate_size=64,
      num_heads=2,
      out_hidden_size=64,
      fullatt_block_indexes=[1],
    ),
  )


def qwen25_vl_7b_config(tokenizer):
  """The architecture of Qwen2.5-VL-7B-Instruct (its config.json), with this tokenizer's special
  ids; the vocabulary keeps the real size so the embedding and LM head weigh what they do."""
  return _config(
    tokenizer,
    text=dict(
      vocab_size=152064,
      hidden_size=3584,
      intermediate_size=18944,
      num_hidden_layers=28,
      num_attention_heads=28,
      num_key_value_heads=4,
      max_position_embeddings=128000,
      rms_norm_eps=1e-6,
      tie_word_embeddings=False,
      rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    ),
    vision=dict(
      depth=32,
      hidden_size=1280,
      intermediate_size=3420,
      num_heads=16,
      out_hidden_size=3584,
      fullatt_block_indexes=[7, 15, 23, 31],
    ),
  )


def image_processor():
  """Qwen2.5-VL's image processor: 14x14 patches, 2 frames per temporal patch, 2x2 merge."""
  from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

  return Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2)


def save_tiny_qwen(out_dir: str, seed: int = 0) -> str:
  """Builds the tiny model with seeded random weights and saves it; returns `out_dir`."""
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration

  tokenizer = build_tokenizer()
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(tiny_config(tokenizer)).eval()
  model.generation_config.eos_token_id = tokenizer.eos_token_id
  model.generation_config.pad_token_id = tokenizer.pad_token_id
  model.save_pretrained(out_dir)
  # The processor itself cannot be saved without a video processor: save its parts.
  tokenizer.save_pretrained(out_dir)
  image_processor().save_pretrained(out_dir)
  return out_dir
