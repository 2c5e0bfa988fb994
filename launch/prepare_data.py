r"""Converts public data sets into sample stores (genmask_jax/data/records.py).

Each subcommand writes one store per split under --output/<split>/:

  python -m launch.prepare_data refcoco-refer --refer_dir=refer/data --dataset=refcoco+ \
      --split_by=unc --image_dir=coco/train2014 --output=data/refcoco+_unc
  python -m launch.prepare_data refcoco-json --json=manual/refcoco.json --dataset=refcocog \
      --split_by=umd --output=data/refcocog_umd
  python -m launch.prepare_data refcoco-tfds --data_dir=~/tensorflow_datasets \
      --config=refcoco_unc --output=data/refcoco_unc
  python -m launch.prepare_data ade20k --root=ADEChallengeData2016 --output=data/ade20k
  python -m launch.prepare_data cocostuff --image_dir=coco/train2017 \
      --label_dir=stuffthingmaps_trainval2017/train2017 --labels=cocostuff/labels.txt \
      --output=data/cocostuff
  python -m launch.prepare_data pascal-part --json=vlpart/pascal_part/train.json \
      --image_dir=VOCdevkit/VOC2010/JPEGImages --output=data/pascal_part
  python -m launch.prepare_data reasonseg --root=ReasonSeg --output=data/reasonseg
  python -m launch.prepare_data text-image --jsonl=captions.jsonl --name=mydata --output=data/t2i
  python -m launch.prepare_data synthetic --output=data/synthetic

An existing non-empty --output is refused unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
from collections.abc import Iterable, Iterator

from tqdm import tqdm

from genmask_jax.data import records, synthetic
from genmask_jax.data.sources import reasonseg, refcoco, semseg, text_image
from genmask_jax.runtime import fileio


def write_splits(
  samples: Iterable[tuple[str, records.Sample]],
  output: str,
  *,
  shard_size: int,
  overwrite: bool,
  info: dict,
  total: int | None = None,
) -> dict[str, int]:
  """Writes (split, sample) pairs to output/<split>/; returns the number of samples per split."""
  writers: dict[str, records.RecordWriter] = {}
  counts: collections.Counter[str] = collections.Counter()
  # A failure leaves every store without meta.json, i.e. marked incomplete.
  with contextlib.ExitStack() as stack:
    for split, sample in tqdm(samples, total=total, unit="sample", desc=output):
      if split not in writers:
        writers[split] = stack.enter_context(
          records.RecordWriter(
            os.path.join(output, split), shard_size, overwrite=overwrite, info=info
          )
        )
      writers[split].write(sample)
      counts[split] += 1
  return dict(counts)


def _with_split(split: str, samples: Iterator[records.Sample]):
  for sample in samples:
    yield split, sample


def _refcoco(args) -> tuple[Iterable, int]:
  if args.split_by not in refcoco.SPLIT_BYS[args.dataset]:
    raise SystemExit(f"{args.dataset} is split by {refcoco.SPLIT_BYS[args.dataset]}")
  if args.command == "refcoco-refer":
    refs, images = refcoco.refer_refs(args.refer_dir, args.dataset, args.split_by)
    image_dir = args.image_dir
  else:
    refs, images = refcoco.tfds_json_refs(args.json, args.dataset, args.split_by)
    image_dir = args.image_dir or os.path.join(os.path.dirname(args.json), "coco_train2014")
  total = sum(len(r["sentences"]) for r in refs)
  samples = refcoco.samples_from_refs(
    refs, images, image_dir, args.dataset, args.split_by, args.text_field
  )
  return samples, total


def _refcoco_tfds(args) -> tuple[Iterable, None]:
  return (
    (sample["source"]["split"], sample)
    for split in args.splits
    for sample in refcoco.tfds_samples(args.data_dir, args.config, split)
  ), None


def _ade20k(args) -> tuple[Iterable, None]:
  names = semseg.ade20k_class_names(os.path.join(args.root, "objectInfo150.txt"))

  def samples():
    for split in args.splits:
      files = semseg.paired_files(
        os.path.join(args.root, "images", split), os.path.join(args.root, "annotations", split)
      )
      yield from _with_split(
        split,
        semseg.label_map_samples(
          "ade20k",
          split,
          files,
          semseg.ade20k_classes,
          names,
          classes_per_image=args.classes_per_image,
          seed=args.seed,
        ),
      )

  return samples(), None


def _cocostuff(args) -> tuple[Iterable, None]:
  names = semseg.cocostuff_class_names(args.labels)
  files = semseg.paired_files(args.image_dir, args.label_dir)
  samples = semseg.label_map_samples(
    "cocostuff",
    args.split,
    files,
    semseg.cocostuff_classes(names),
    names,
    classes_per_image=args.classes_per_image,
    seed=args.seed,
  )
  return _with_split(args.split, samples), None


def _pascal_part(args) -> tuple[Iterable, None]:
  samples = semseg.pascal_part_samples(
    args.json,
    args.image_dir,
    args.split,
    classes_per_image=args.classes_per_image,
    seed=args.seed,
  )
  return _with_split(args.split, samples), None


REASONSEG_SPLITS = ("train", "val", "test")


def _reasonseg(args) -> tuple[Iterable, None]:
  def folder(split: str) -> str:
    return os.path.join(args.root, split)

  splits = args.splits or [s for s in REASONSEG_SPLITS if os.path.isdir(folder(s))]
  for split in args.splits or REASONSEG_SPLITS:
    if not os.path.isdir(folder(split)):
      if args.splits:  # Asked for by name: an error, not a skip.
        raise SystemExit(f"--splits: no folder {folder(split)}")
      print(f"skipping split {split!r}: {folder(split)} does not exist")
  if not splits:
    raise SystemExit(f"--root={args.root}: none of the folders {list(REASONSEG_SPLITS)} exists")

  def samples():
    for split in splits:
      texts = args.texts or ("all" if split == "train" else "first")
      split_dir = os.path.join(args.root, split)
      yield from _with_split(split, reasonseg.reasonseg_samples(split_dir, split, texts))

  return samples(), None


def _text_image(args) -> tuple[Iterable, None]:
  if args.folder:
    samples = text_image.folder_samples(args.folder, args.name)
  else:
    samples = text_image.jsonl_samples(args.jsonl, args.name)
  return _with_split("train", samples), None


def _synthetic(args) -> tuple[Iterable, int]:
  counts = {
    "train": args.num_train,
    "val": args.num_val,
    "heldout": args.num_heldout,
    "gen": args.num_gen,
  }
  samples = (
    (split, sample)
    for split, num in counts.items()
    for sample in synthetic.samples(split, num, seed=args.seed, image_size=args.image_size)
  )
  return samples, sum(counts.values())


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  commands = parser.add_subparsers(dest="command", required=True)

  def command(name, run, help_text):
    sub = commands.add_parser(name, help=help_text)
    sub.add_argument("--output", required=True, help="Writes one sample store per split here.")
    sub.add_argument("--shard_size", type=int, default=1000, help="Records per shard file.")
    sub.add_argument("--overwrite", action="store_true", help="Replace an existing --output.")
    sub.set_defaults(run=run)
    return sub

  def text_field(sub):
    sub.add_argument(
      "--text_field",
      choices=refcoco.TEXT_FIELDS,
      default="sent",
      help="REFER's normalized 'sent' (as LISA) or the original 'raw' sentence.",
    )

  def semantic(sub):
    sub.add_argument("--classes_per_image", type=int, default=3)
    sub.add_argument("--seed", type=int, default=0, help="Seeds the per-image class draw.")

  sub = command("refcoco-refer", _refcoco, "RefCOCO/+/g from the REFER files.")
  sub.add_argument("--refer_dir", required=True, help="Holds <dataset>/refs(<split_by>).p.")
  sub.add_argument("--dataset", choices=sorted(refcoco.SPLIT_BYS), required=True)
  sub.add_argument("--split_by", required=True, help="unc, umd or google.")
  sub.add_argument("--image_dir", required=True, help="COCO train2014 images.")
  text_field(sub)

  sub = command("refcoco-json", _refcoco, "RefCOCO/+/g from TFDS's manual refcoco.json.")
  sub.add_argument("--json", required=True)
  sub.add_argument("--dataset", choices=sorted(refcoco.SPLIT_BYS), required=True)
  sub.add_argument("--split_by", required=True)
  sub.add_argument("--image_dir", help="Default: coco_train2014/ beside the JSON file.")
  text_field(sub)

  sub = command("refcoco-tfds", _refcoco_tfds, "RefCOCO/+/g from a prepared TFDS ref_coco.")
  sub.add_argument("--data_dir", required=True)
  sub.add_argument("--config", required=True, help="refcoco_unc, refcocoplus_unc, ...")
  sub.add_argument(
    "--splits", nargs="+", default=["train", "validation", "testA", "testB"], help="TFDS names."
  )

  sub = command("ade20k", _ade20k, "ADE20K (ADEChallengeData2016) as binary masks.")
  sub.add_argument("--root", required=True, help="ADEChallengeData2016/ (objectInfo150.txt).")
  sub.add_argument("--splits", nargs="+", default=list(semseg.ADE20K_SPLITS))
  semantic(sub)

  sub = command("cocostuff", _cocostuff, "COCO-Stuff (stuffthingmaps) as binary masks.")
  sub.add_argument("--image_dir", required=True)
  sub.add_argument("--label_dir", required=True)
  sub.add_argument("--labels", required=True, help="COCO-Stuff labels.txt ('N: name').")
  sub.add_argument("--split", default="train2017")
  semantic(sub)

  sub = command("pascal-part", _pascal_part, "PASCAL-Part (COCO-format JSON) as binary masks.")
  sub.add_argument("--json", required=True)
  sub.add_argument("--image_dir", required=True)
  sub.add_argument("--split", default="train")
  semantic(sub)

  sub = command("reasonseg", _reasonseg, "ReasonSeg (<root>/<split>/*.jpg + *.json).")
  sub.add_argument("--root", required=True)
  sub.add_argument(
    "--splits", nargs="+", help="Default: those of train, val, test that exist under --root."
  )
  sub.add_argument(
    "--texts", choices=reasonseg.TEXTS, help="Default: every query for train, the first else."
  )

  sub = command("text-image", _text_image, "Text-to-image pairs (generation samples).")
  source = sub.add_mutually_exclusive_group(required=True)
  source.add_argument("--folder", help="Images with same-name .txt captions.")
  source.add_argument("--jsonl", help='Lines of {"image": path, "caption": text}.')
  sub.add_argument("--name", required=True, help="Data set name, the sample id prefix.")

  sub = command("synthetic", _synthetic, "The procedural shapes set (demo and tests).")
  sub.add_argument("--num_train", type=int, default=4096)
  sub.add_argument("--num_val", type=int, default=256)
  sub.add_argument("--num_heldout", type=int, default=256)
  sub.add_argument("--num_gen", type=int, default=4096)
  sub.add_argument("--image_size", type=int, default=64)
  sub.add_argument("--seed", type=int, default=0)
  return parser


def main(argv: list[str] | None = None) -> dict[str, int]:
  args = _parser().parse_args(argv)
  complete = [
    s
    for s in fileio.listdir(args.output)
    if fileio.exists(f"{args.output}/{s}/{records.META_FILE}")
  ]
  if complete and not args.overwrite:
    raise SystemExit(
      f"{args.output} holds finished stores ({', '.join(complete)}); pass --overwrite to replace"
    )
  samples, total = args.run(args)
  info = {k: v for k, v in vars(args).items() if k not in ("run", "overwrite")}
  counts = write_splits(
    samples,
    args.output,
    shard_size=args.shard_size,
    overwrite=True,  # Finished stores were refused above; unfinished ones are redone.
    info=info,
    total=total,
  )
  for split, count in sorted(counts.items()):
    print(f"{os.path.join(args.output, split)}: {count} samples")
  return counts


if __name__ == "__main__":
  main()
