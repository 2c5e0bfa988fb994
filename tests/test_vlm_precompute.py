"""launch/precompute_vlm.py on the tiny Qwen2.5-VL: shapes, resume, worker sharding, metadata."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from genmask_jax.data import features as F
from genmask_jax.data import records, store
from genmask_jax.vlm import encode, image_policy, prompts, tiny_qwen

TASKS = ["segmentation", "generation", "segmentation", "segmentation", "generation", "segmentation"]
TEXTS = ["red cat", "A photo of a dog.", "blue car on the left", "what can fly?", "A bus.", "man"]
MODEL_ID = "tiny-qwen"


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
  path = tiny_qwen.save_tiny_qwen(str(tmp_path_factory.mktemp("tiny_qwen")), seed=0)
  return (path, *encode.load_vlm(path))


@pytest.fixture(scope="module")
def sample_store(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("samples"))
  rng = np.random.default_rng(0)
  with records.RecordWriter(path, shard_size=4) as writer:
    for i, (task, text) in enumerate(zip(TASKS, TEXTS, strict=True)):
      image = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
      mask = (rng.random((56, 56)) > 0.5).astype(np.uint8) if task == "segmentation" else None
      writer.write(
        records.make_sample(
          sample_id=f"s{i}", task=task, image=image, text=text, source={}, mask=mask
        )
      )
  return path


def run(vlm, samples_path, out, num_workers=1, worker_index=0, reasoning=False) -> bool:
  _, model, processor = vlm
  samples = records.RecordReader(samples_path)
  meta = F.FeatureMeta(
    MODEL_ID,
    prompts.prompt_template(reasoning),
    "bfloat16",
    64,
    image_policy=image_policy.DEFAULT.to_record(),
  )  # As the command line.
  writer = F.FeatureWriter(
    str(out), meta, F.StoreLayout(len(samples), num_workers, 2), worker_index
  )
  return encode.precompute(
    model, processor, samples, writer, batch_size=2, reasoning=reasoning, max_new_tokens=6
  )


def direct_hidden(vlm, image, instruction: str, kept: int) -> np.ndarray:
  """The last `kept` final-layer hidden states of one prompt, run through transformers alone
  (no batching, padding or prefix search of the code under test)."""
  _, model, processor = vlm
  content = [{"type": "text", "text": instruction}]
  if image is not None:
    content.insert(0, {"type": "image"})
  text = processor.tokenizer.apply_chat_template(
    [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
  )
  inputs = processor(text=[text], images=None if image is None else [image], return_tensors="pt")
  with torch.no_grad():
    hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][0]
  return hidden[-kept:].float().numpy()


def direct_rewrite(vlm, image, query: str) -> str:
  """The VLM's greedy answer to the rewrite prompt, through transformers' generate alone."""
  _, model, processor = vlm
  instruction = prompts.REWRITE_INSTRUCTION.format(query=query)
  content = [{"type": "image"}, {"type": "text", "text": instruction}]
  text = processor.tokenizer.apply_chat_template(
    [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
  )
  inputs = processor(text=[text], images=[image], return_tensors="pt")
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
  new = out[0, inputs["input_ids"].shape[1] :]
  return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def assert_bf16_close(stored: np.ndarray, expected: np.ndarray) -> None:
  """Stored bf16 features against fp32 ones: bf16 keeps 8 significant bits (relative rounding
  up to 2^-9). Measured: at most 7.8e-3 absolute on values up to 3.5 (0.22%), i.e. rounding
  alone; batching with padding adds ~1e-6. A wrong token, prompt or model is off by O(1)."""
  assert stored.shape == expected.shape
  np.testing.assert_allclose(stored, expected, rtol=2**-8, atol=1e-3)


def store_files(path) -> dict[str, bytes]:
  names = sorted(os.listdir(path))
  return {n: open(os.path.join(path, n), "rb").read() for n in names}


@pytest.fixture(scope="module")
def full_store(vlm, sample_store, tmp_path_factory):
  out = tmp_path_factory.mktemp("full")
  assert run(vlm, sample_store, out)
  return out


def test_features_have_ids_shapes_texts_and_values(vlm, sample_store, full_store):
  tokenizer = vlm[2].tokenizer
  samples = records.RecordReader(sample_store)
  n_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
  reader = F.FeatureReader(str(full_store))
  assert reader.ids() == [f"s{i}" for i in range(6)]
  policy = image_policy.DEFAULT.to_record()
  assert reader.meta == F.FeatureMeta(
    MODEL_ID, prompts.prompt_template(), "bfloat16", 64, image_policy=policy
  )
  for i, sample_id in enumerate(reader.ids()):
    # The user content and the assistant header: for segmentation the vision markers, 4 image
    # tokens (56x56) and the instruction; for generation the caption.
    kept = n_tokens("<|im_end|>\n<|im_start|>assistant\n")
    if TASKS[i] == "segmentation":
      kept += 6 + n_tokens(prompts.SEGMENT_INSTRUCTION.format(target=TEXTS[i]))
    else:
      kept += n_tokens(TEXTS[i])
    hidden = reader.get(sample_id)
    assert hidden.shape == (kept, 64) and np.all(np.isfinite(hidden))
    assert reader.text(sample_id) == TEXTS[i]
    if TASKS[i] == "segmentation":
      image = encode.sample_image(samples[i])
      instruction = prompts.SEGMENT_INSTRUCTION.format(target=TEXTS[i])
      expected = direct_hidden(vlm, image, instruction, kept)
    else:
      expected = direct_hidden(vlm, None, TEXTS[i], kept)
    assert_bf16_close(hidden, expected)
  with pytest.raises(F.FeatureError, match="'s6'"):
    reader.get("s6")


def test_interrupted_run_resumes_to_the_same_store(
  vlm, sample_store, full_store, tmp_path, monkeypatch
):
  real_write, real_encode = F.FeatureWriter.write_shard, encode.encode_prompts

  def write_then_die(self, shard, items):
    real_write(self, shard, items)
    raise KeyboardInterrupt("killed after the first shard")

  monkeypatch.setattr(F.FeatureWriter, "write_shard", write_then_die)
  with pytest.raises(KeyboardInterrupt):
    run(vlm, sample_store, tmp_path)
  with pytest.raises(F.FeatureError, match="incomplete"):
    F.FeatureReader(str(tmp_path))
  first = tmp_path / "features-00000-of-00001-00000.array_record"
  first_stat = os.stat(first)
  (tmp_path / "features-00000-of-00001-00001.array_record.tmp-99").write_bytes(b"half a shard")

  monkeypatch.setattr(F.FeatureWriter, "write_shard", real_write)
  encoded = []

  def counting_encode(model, processor, batch, *args):
    encoded.append(len(batch))
    return real_encode(model, processor, batch, *args)

  monkeypatch.setattr(encode, "encode_prompts", counting_encode)
  assert run(vlm, sample_store, tmp_path)
  assert sum(encoded) == 4  # Only the two missing shards were computed.
  assert os.stat(first).st_mtime_ns == first_stat.st_mtime_ns
  assert store_files(tmp_path) == store_files(full_store)


def test_two_workers_cover_every_id_once(vlm, sample_store, full_store, tmp_path):
  assert not run(vlm, sample_store, tmp_path, num_workers=2, worker_index=1)
  assert not store.is_complete(str(tmp_path))
  assert run(vlm, sample_store, tmp_path, num_workers=2, worker_index=0)
  reader, full = F.FeatureReader(str(tmp_path)), F.FeatureReader(str(full_store))
  assert reader.ids() == full.ids()
  # Worker slices are [0, 3) and [3, 6): different batches, the same features up to bf16.
  for sample_id in reader.ids():
    np.testing.assert_allclose(reader.get(sample_id), full.get(sample_id), rtol=2e-2, atol=2e-2)


def test_store_from_another_encoder_or_template_fails_check_meta(full_store):
  meta = F.FeatureReader(str(full_store)).meta
  F.check_meta(meta, MODEL_ID, prompts.prompt_template())
  with pytest.raises(F.FeatureError, match="encoded by model 'tiny-qwen', expected 'Qwen2.5-VL"):
    F.check_meta(meta, "Qwen2.5-VL-7B-Instruct", prompts.prompt_template())
  with pytest.raises(F.FeatureError, match="prompt template"):
    F.check_meta(meta, MODEL_ID, prompts.prompt_template(reasoning=True))


def test_reasoning_mode_encodes_and_stores_the_rewrite(vlm, sample_store, full_store, tmp_path):
  tokenizer = vlm[2].tokenizer
  n_tokens = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])
  closing = n_tokens("<|im_end|>\n<|im_start|>assistant\n")
  assert run(vlm, sample_store, tmp_path, reasoning=True)
  reader, plain = F.FeatureReader(str(tmp_path)), F.FeatureReader(str(full_store))
  F.check_meta(reader.meta, MODEL_ID, prompts.prompt_template(reasoning=True))
  samples = records.RecordReader(sample_store)
  for i, sample_id in enumerate(reader.ids()):
    sample = samples[i]
    if sample["task"] == "generation":
      assert reader.text(sample_id) == sample["text"]
      np.testing.assert_array_equal(reader.get(sample_id), plain.get(sample_id))
      continue
    image = encode.sample_image(sample)
    # The tiny random VLM answers every rewrite prompt with non-empty text (measured: 'Yma..zrple'
    # or 'Yma..zQ'), so the rewrite is what gets stored, never the query kept as a fallback.
    rewrite = direct_rewrite(vlm, image, sample["text"])
    assert rewrite and rewrite != sample["text"]
    assert reader.text(sample_id) == rewrite
    kept = 6 + n_tokens(prompts.SEGMENT_INSTRUCTION.format(target=rewrite)) + closing
    expected = direct_hidden(vlm, image, prompts.SEGMENT_INSTRUCTION.format(target=rewrite), kept)
    assert_bf16_close(reader.get(sample_id), expected)
    # ... and it is the rewrite that was encoded, not the query.
    got, query = reader.get(sample_id), plain.get(sample_id)
    assert got.shape != query.shape or np.abs(got - query).max() > 0.1


def test_command_line(vlm, sample_store, full_store, tmp_path):
  """Two stores in one process (one model load); --samples and --out must pair up."""

  def run(samples, outs):
    command = [sys.executable, "-m", "launch.precompute_vlm", f"--checkpoint={vlm[0]}"]
    command += [f"--samples={','.join(samples)}", f"--out={','.join(map(str, outs))}"]
    command += [f"--model_id={MODEL_ID}", "--batch_size=2", "--shard_size=2"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)

  outs = [tmp_path / "a", tmp_path / "b"]
  result = run([sample_store, sample_store], outs)
  assert result.returncode == 0, result.stderr
  for out in outs:
    assert store_files(out) == store_files(full_store)
  result = run([sample_store, sample_store], [tmp_path / "c"])
  assert result.returncode != 0 and "give one --out per --samples" in result.stderr
