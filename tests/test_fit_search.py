"""launch.compile --search: the candidates' order, what is skipped, and the choice, with the
compiler replaced by a table of outcomes (tests/test_compile.py compiles for real)."""

import pytest

from configs.refcoco import get_config
from genmask_jax.fit import check, search
from genmask_jax.fit.report import StepReport
from genmask_jax.runtime import accelerators

GIB = 2**30
TARGET = check.Target(accelerators.parse("v5p-8"))  # 4 chips, 95.7 GiB each.


def trial():
  config = get_config("trial")
  for task in ("segmentation", "generation"):
    config.data[task].global_batch_size = 8
  return config


def test_candidates_cheapest_recompute_first_then_fewer_microbatches():
  rows = search.rows(trial(), TARGET, meshes=[(1, -1, 1)], microbatches=[1, 2, 4])
  keys = [(r.candidate.remat, r.candidate.microbatches) for r in rows]
  recompute = [r.recompute_flops for r in rows]
  assert recompute == sorted(recompute)
  # Splash keeps the attention for the name policies: none and dots_attention recompute nothing;
  # the leaner of the two comes first, and more microbatches only after fewer.
  assert keys[:4] == [("dots_attention", 1), ("none", 1), ("dots_attention", 2), ("none", 2)]
  assert keys[-1] == ("full", 2)


def test_batches_that_do_not_split_are_no_candidates():
  rows = search.rows(trial(), TARGET, meshes=[(1, -1, 1)], microbatches=[1, 2, 4])
  assert {r.candidate.microbatches for r in rows} == {1, 2}  # 8 / (4 shards x 4) is no integer.
  assert all(r.per_shard_batch == (8 // 4 // r.candidate.microbatches,) * 2 for r in rows)


def fake_compiler(monkeypatch, peaks: dict):
  """check.compile_for answering with `peaks[(remat, microbatches)]` GiB (None: out of memory)."""
  compiled = []

  def compile_for(config, target, names):
    key = (config.dit.remat_policy, config.microbatches)
    compiled.append(key)
    report = StepReport("train", target.chips, int(95.74 * GIB), {}, 0)
    if peaks[key] is None:
      report.error = "JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory"
    else:
      report.peak_bytes = int(peaks[key] * GIB)
    return [report]

  monkeypatch.setattr(check, "compile_for", compile_for)
  return compiled


def test_search_skips_what_a_leaner_policy_rules_out_and_keeps_headroom(monkeypatch):
  peaks = {
    ("dots_attention", 1): None,  # Out of memory: "none" at 1 microbatch keeps more, skipped.
    ("dots_attention", 2): 90.0,  # Fits, but with under 10% free.
    ("none", 2): 95.0,  # Fits the chip (95.7 GiB), under the headroom too.
    ("save_attention_ffn", 1): 60.0,  # The choice: the next cheapest with 10% free.
  }
  compiled = fake_compiler(monkeypatch, peaks)
  rows = search.rows(trial(), TARGET, meshes=[(1, -1, 1)], microbatches=[1, 2])
  choice = search.search(trial(), TARGET, rows, headroom=0.1)
  assert compiled == [("dots_attention", 1), ("dots_attention", 2), ("none", 2),
                      ("save_attention_ffn", 1)]  # fmt: skip
  assert (choice.candidate.remat, choice.candidate.microbatches) == ("save_attention_ffn", 1)
  skipped = next(r for r in rows if (r.candidate.remat, r.candidate.microbatches) == ("none", 1))
  assert skipped.report is None and "dots_attention" in skipped.skipped


def test_nothing_fits(monkeypatch):
  rows = search.rows(trial(), TARGET, policies=["full"], meshes=[(1, -1, 1)], microbatches=[1])
  fake_compiler(monkeypatch, {("full", 1): None})
  assert search.search(trial(), TARGET, rows, headroom=0.1) is None


@pytest.mark.parametrize("mesh", [(1, -1, 3), (3, -1, 1)])
def test_meshes_that_do_not_divide_the_slice_are_no_candidates(mesh):
  assert search.rows(trial(), TARGET, meshes=[mesh], microbatches=[1]) == []
