"""The VLM prompts (paper 2.3) and which of their tokens become DiT context.

Segmentation: one user turn holding the image and "Please segment the {target} in the image.".
Generation: one user turn holding the caption alone. Both are rendered with the checkpoint's
chat template and the assistant header (`add_generation_prompt`).

Kept tokens: like Qwen-Image, the fixed chat-template prefix (the system turn and
`<|im_start|>user\\n`, see `chat_prefix_ids`) is dropped, since it is the same for every sample;
everything after it is kept: vision start, image tokens, vision end, the instruction, and the
closing `<|im_end|>\\n<|im_start|>assistant\\n` (in a causal LM only these last tokens have seen
the whole instruction). Padding is never kept.

Torch-free, so the training side can import `prompt_template` to check a feature store.
"""

from __future__ import annotations

SEGMENT_INSTRUCTION = "Please segment the {target} in the image."
REWRITE_INSTRUCTION = (
  "{query}\nDescribe the object in the image that answers this request as a short noun phrase."
)
_SENTINEL = "\x00user content\x00"


def segmentation_messages(target: str) -> list[dict]:
  text = SEGMENT_INSTRUCTION.format(target=target)
  return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def generation_messages(caption: str) -> list[dict]:
  return [{"role": "user", "content": [{"type": "text", "text": caption}]}]


def rewrite_messages(query: str) -> list[dict]:
  """Reasoning mode, first stage: ask the VLM for an explicit description of the target."""
  text = REWRITE_INSTRUCTION.format(query=query)
  return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def prompt_template(reasoning: bool = False) -> str:
  """Names the prompts and kept tokens; recorded in a feature store and checked by its users."""
  template = (
    f"segmentation: <image>{SEGMENT_INSTRUCTION} | generation: {{caption}} | "
    "kept: user turn + assistant header"
  )
  if reasoning:
    template += f" | target rewritten by the VLM from: <image>{REWRITE_INSTRUCTION}"
  return template


def chat_prefix_ids(tokenizer) -> list[int]:
  """Token ids of the chat-template text before the user content: the tokens to drop."""
  text = tokenizer.apply_chat_template(
    generation_messages(_SENTINEL), tokenize=False, add_generation_prompt=True
  )
  prefix = text[: text.index(_SENTINEL)]
  return tokenizer(prefix, add_special_tokens=False)["input_ids"]
