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

import collections
import contextlib
import os
import sys
from collections.abc import Iterable, Iterator

from absl import flags
from tqdm import tqdm

from genmask_jax.data import records, store, synthetic
from genmask_jax.data.sources import reasonseg, refcoco, semseg, text_image
from genmask_jax.runtime import fileio
from launch.common import commands


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
  # A failure leaves every store unfinished (store.is_complete is False): a re-run redoes it.
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
    image_dir = args.image_dir or refcoco.tfds_json_image_dir(args.json)
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
  per_image = dict(classes_per_image=args.classes_per_image, seed=args.seed)
  return (
    (split, sample)
    for split in args.splits
    for sample in semseg.ade20k_samples(args.root, split, **per_image)
  ), None


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


def _reasonseg(args) -> tuple[Iterable, None]:
  def folder(split: str) -> str:
    return os.path.join(args.root, split)

  splits = args.splits or [s for s in reasonseg.SPLITS if os.path.isdir(folder(s))]
  for split in args.splits or reasonseg.SPLITS:
    if not os.path.isdir(folder(split)):
      if args.splits:  # Asked for by name: an error, not a skip.
        raise SystemExit(f"--splits: no folder {folder(split)}")
      print(f"skipping split {split!r}: {folder(split)} does not exist")
  if not splits:
    raise SystemExit(f"--root={args.root}: none of the folders {list(reasonseg.SPLITS)} exists")

  def samples():
    for split in splits:
      texts = args.texts or reasonseg.default_texts(split)
      yield from _with_split(split, reasonseg.reasonseg_samples(folder(split), split, texts))

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


COMMANDS = {  # name: (what it converts, its converter)
  "refcoco-refer": ("RefCOCO/+/g from the REFER files.", _refcoco),
  "refcoco-json": ("RefCOCO/+/g from TFDS's manual refcoco.json.", _refcoco),
  "refcoco-tfds": ("RefCOCO/+/g from a prepared TFDS ref_coco.", _refcoco_tfds),
  "ade20k": ("ADE20K (ADEChallengeData2016) as binary masks.", _ade20k),
  "cocostuff": ("COCO-Stuff (stuffthingmaps) as binary masks.", _cocostuff),
  "pascal-part": ("PASCAL-Part (COCO-format JSON) as binary masks.", _pascal_part),
  "reasonseg": ("ReasonSeg (<root>/<split>/*.jpg + *.json).", _reasonseg),
  "text-image": ("Text-to-image pairs (generation samples).", _text_image),
  "synthetic": ("The procedural shapes set (demo and tests).", _synthetic),
}


def command_flags(command: str) -> flags.FlagValues:
  """The flags of one command, in a FlagValues of its own: flags of one name differ between
  commands (and tests run main() again in one process)."""
  values = flags.FlagValues()
  define = commands.definers(values)
  string, integer, enum, listed = define.string, define.integer, define.enum, define.list
  string("output", None, "Writes one sample store per split here.", required=True)
  integer("shard_size", 1000, "Records per shard file.")
  define.bool("overwrite", help="Replace an existing --output.")
  if command in ("refcoco-refer", "refcoco-json"):
    if command == "refcoco-refer":
      string("refer_dir", None, "Holds <dataset>/refs(<split_by>).p.", required=True)
    else:
      string("json", None, "TFDS's manual refcoco.json.", required=True)
    enum("dataset", None, sorted(refcoco.SPLIT_BYS), "The data set.", required=True)
    string("split_by", None, "unc, umd or google.", required=True)
    if command == "refcoco-refer":
      string("image_dir", None, "COCO train2014 images.", required=True)
    else:
      string("image_dir", None, "Default: coco_train2014/ beside the JSON file.")
    enum(
      "text_field",
      "sent",
      refcoco.TEXT_FIELDS,
      "REFER's normalized 'sent' (as LISA) or the original 'raw' sentence.",
    )
  elif command == "refcoco-tfds":
    string("data_dir", None, "TFDS data folder.", required=True)
    string("config", None, "refcoco_unc, refcocoplus_unc, ...", required=True)
    listed("splits", ["train", "validation", "testA", "testB"], "TFDS split names.")
  elif command == "ade20k":
    string("root", None, "ADEChallengeData2016/ (objectInfo150.txt).", required=True)
    listed("splits", list(semseg.ADE20K_SPLITS), "Splits to convert.")
  elif command == "cocostuff":
    string("image_dir", None, "COCO images of the split.", required=True)
    string("label_dir", None, "stuffthingmaps label maps of the split.", required=True)
    string("labels", None, "COCO-Stuff labels.txt ('N: name').", required=True)
    string("split", "train2017", "The split's name in the store.")
  elif command == "pascal-part":
    string("json", None, "VLPart's COCO-format PASCAL-Part file.", required=True)
    string("image_dir", None, "VOC2010 JPEGImages.", required=True)
    string("split", "train", "The split's name in the store.")
  elif command == "reasonseg":
    string("root", None, "Holds the split folders.", required=True)
    listed("splits", None, "Default: those of train, val, test that exist under --root.")
    enum("texts", None, reasonseg.TEXTS, "Default: every query for train, the first else.")
  elif command == "text-image":
    string("folder", None, "Images with same-name .txt captions.")
    string("jsonl", None, 'Lines of {"image": path, "caption": text}.')
    flags.mark_flags_as_mutual_exclusive(["folder", "jsonl"], required=True, flag_values=values)
    string("name", None, "Data set name, the sample id prefix.", required=True)
  elif command == "synthetic":
    integer("num_train", 4096, "Training scenes.")
    integer("num_val", 256, "Validation scenes.")
    integer("num_heldout", 256, "Held-out scenes (unseen color-kind pairs).")
    integer("num_gen", 4096, "Captioned scenes for generation.")
    integer("image_size", 64, "Image side.")
    integer("seed", 0, "Seeds the scenes.")
  if command in ("ade20k", "cocostuff", "pascal-part"):
    integer(
      "classes_per_image",
      0,
      "0: every class of an image is a sample (training draws classes per use); k: k drawn once.",
      lower_bound=0,
    )
    integer("seed", 0, "Seeds the per-image class draw.")
  return values


def parse_flags(argv: list[str] | None = None) -> commands.Flags:
  """The command and its flags; exits 2 naming a bad one."""
  argv = sys.argv[1:] if argv is None else argv
  command = argv[0] if argv else None
  if command not in COMMANDS:
    if {"--help", "-h"} & set(argv):
      listed = "\n".join(f"  {name:14s} {text}" for name, (text, _) in COMMANDS.items())
      print(f"{__doc__}\ncommands (`COMMAND --help`: its flags):\n{listed}")
      raise SystemExit(0)
    commands.usage_error(f"give a command first, one of {', '.join(COMMANDS)}")
  values = command_flags(command)
  rest = commands.parse(values, argv[1:], f"{command}: {COMMANDS[command][0]}")
  if rest:
    commands.usage_error(f"unexpected arguments {rest}")
  return commands.Flags(command=command, **values.flag_values_dict(), run=COMMANDS[command][1])


def main(argv: list[str] | None = None) -> dict[str, int]:
  args = parse_flags(argv)
  complete = (
    []
    if args.overwrite
    else [s for s in fileio.listdir(args.output) if store.is_complete(f"{args.output}/{s}")]
  )
  if complete:
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
