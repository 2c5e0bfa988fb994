r"""Upgrades stores written before the store protocol (genmask_jax/data/store.py), in place.

  python -m launch.upgrade_store PATH [PATH ...]

A sample, feature or latent store of the earlier layouts (each kind with a meta.json of its
own) gets a store.json and its workers' parts, which name its existing shard files: no shard
is rewritten or moved, so it is quick on gs:// too. The old metadata goes last, so an
interrupted upgrade can be run again. An unfinished feature store keeps its finished shards:
resume it with its launch/precompute_vlm.py command. An unfinished latent store cannot be
resumed (its shards had another layout): remove it and run launch/precompute_latents.py.
"""

from __future__ import annotations

import os

from absl import app

from genmask_jax.data import features, latents, records, store
from genmask_jax.data.store import StoreError, StoreLayout, StoreMeta
from genmask_jax.runtime import fileio

# The metadata files of the old layouts, removed once the store is upgraded.
_OLD_INDEX_FILES = ("ids.json", "manifest.json")


def _records(path: str, old: dict) -> store.StoreReader:
  """Old: records-SSSSS.array_record, ids.json, meta.json {num_records, shards, tasks, info}."""
  ids = fileio.read_json(os.path.join(path, "ids.json"), StoreError)
  shards, start = [], 0
  for shard in old["shards"]:
    stop = start + shard["num_records"]
    shards.append({"files": {"records": shard["file"]}, "ids": ids[start:stop]})
    start = stop
  sizes = [shard["num_records"] for shard in old["shards"]]
  layout = StoreLayout(old["num_records"], 1, max(sizes, default=1))
  meta = records.RecordMeta(old["tasks"], old["info"])
  store.write_meta(path, StoreMeta(records.KIND, layout, meta))
  store.write_part(path, layout, 0, shards)
  return records.RecordReader(path)


def _features(path: str, old: dict) -> store.StoreReader | None:
  """Old: the shards and .ids.json files of today, meta.json {meta, layout}, manifest.json."""
  meta = features.FeatureMeta(**{k: v for k, v in old["meta"].items() if k != "format_version"})
  layout = StoreLayout(**old["layout"])
  names = set(fileio.listdir(path))
  for name in names:  # Ids were written before their shard: drop those of unfinished shards.
    shard = name.removesuffix(store.IDS_SUFFIX)
    if shard != name and shard + features.SUFFIXES["features"] not in names:
      fileio.remove(os.path.join(path, name))
  store.write_meta(path, StoreMeta(features.KIND, layout, meta))
  for w in range(layout.num_workers):  # Each finished worker's part.
    features.FeatureWriter(path, meta, layout, w).finalize()
  return features.FeatureReader(path) if store.is_complete(path) else None


def _latents(path: str, old: dict) -> store.StoreReader:
  """Old: image-/mask-WWWWW-of-NNNNN.npy and ids-WWWWW-of-NNNNN.json a worker, meta.json."""
  n = old["num_workers"]
  ids_files = [os.path.join(path, f"ids-{w:05d}-of-{n:05d}.json") for w in range(n)]
  unfinished = [w for w, f in enumerate(ids_files) if not fileio.exists(f)]
  if unfinished:
    raise StoreError(
      f"{path}: an unfinished latent store of the old layout (workers {unfinished} of {n}): "
      "remove it and run launch/precompute_latents.py again"
    )
  meta = latents.LatentMeta(old["vae"], old["task"], old["resolution"], old["dtype"])
  # One shard a worker: the shard size is the largest worker slice.
  slices = StoreLayout(old["num_samples"], n, 1)
  size = max(b - a for a, b in map(slices.worker_range, range(n)))
  layout = StoreLayout(old["num_samples"], n, max(size, 1))
  store.write_meta(path, StoreMeta(latents.KIND, layout, meta))
  for w, ids_file in enumerate(ids_files):
    ids = fileio.read_json(ids_file, StoreError)
    files = {role: f"{role}-{w:05d}-of-{n:05d}.npy" for role in latents.roles(meta.task)}
    store.write_part(path, layout, w, [{"files": files, "ids": ids}] if ids else [])
    fileio.remove(ids_file)
  return latents.LatentReader(path)


def upgrade(path: str) -> str:
  """Upgrades the old-layout store at `path`; returns what it now is, in words."""
  old_meta = os.path.join(path, store.OLD_META_FILE)
  if not fileio.exists(old_meta):
    raise StoreError(f"{path}: no {store.OLD_META_FILE}: not a store of the old layouts")
  old = fileio.read_json(old_meta, StoreError)
  if "num_records" in old:
    reader = _records(path, old)
  elif "layout" in old:
    reader = _features(path, old)
  elif "vae" in old:
    reader = _latents(path, old)
  else:
    raise StoreError(f"{old_meta}: not the metadata of a sample, feature or latent store")
  for name in _OLD_INDEX_FILES:
    if fileio.exists(os.path.join(path, name)):
      fileio.remove(os.path.join(path, name))
  fileio.remove(old_meta)  # Last: until then the upgrade can be run again.
  if reader is None:
    return f"{path}: an unfinished feature store, upgraded: resume it with launch/precompute_vlm.py"
  return f"{path}: {reader.kind} store of {len(reader)} samples, upgraded"


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    raise app.UsageError("give the folders of the stores to upgrade")
  for path in argv[1:]:
    print(upgrade(path))


if __name__ == "__main__":
  app.run(main)
