"""Pack the cached MiniLM + drug-review assets for an offline machine.

The MiniLM checkpoint is 87 MiB, mostly the 30522 x 384 word-embedding table.
To move it to a machine without a package registry (the GPU machine used for
the committed results) under a size limit, this zeroes the embedding rows of
tokens that never occur in the drug reviews or the reference sentences and
gzips the result: every computation on those texts is unchanged (unused rows
are never read, their gradient is zero), and the tables keep their shapes.

Usage:
  python -m examples.finetune.pack_assets pack DIR     # here, from the cache
  python -m examples.finetune.pack_assets unpack DIR   # there, into the cache
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np

from examples.finetune import assets
from examples.finetune import data

_EMBEDDING = 'embeddings.word_embeddings.weight'


def used_token_ids(tokenizer, texts) -> np.ndarray:
  ids = {0, 100, 101, 102, 103}  # [PAD], [UNK], [CLS], [SEP], [MASK]
  for enc in tokenizer.encode_batch(list(texts)):
    ids.update(enc.ids)
  return np.array(sorted(ids))


def pack(dest: Path) -> None:
  from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top
  from examples.finetune import reference_hidden_states as ref  # pylint: disable=g-import-not-at-top

  model_dir = assets.fetch_minilm()
  reviews_zip = assets.fetch_drug_reviews()
  tokenizer = data.load_tokenizer(model_dir)
  texts = list(ref.REFERENCE_SENTENCES)
  for split in data.load_drug_reviews(reviews_zip).values():
    texts += list(split.texts)
  keep = used_token_ids(tokenizer, texts)
  weights = load_file(str(model_dir / 'model.safetensors'))
  table = weights[_EMBEDDING]
  pruned = np.zeros_like(table)
  pruned[keep] = table[keep]
  weights[_EMBEDDING] = pruned
  dest.mkdir(parents=True, exist_ok=True)
  tmp = dest / 'model.safetensors'
  save_file(weights, str(tmp))
  with open(tmp, 'rb') as src, gzip.open(dest / 'model.safetensors.gz',
                                         'wb', compresslevel=9) as out:
    shutil.copyfileobj(src, out)
  tmp.unlink()
  for name in ('config.json', 'tokenizer.json'):
    shutil.copy(model_dir / name, dest / name)
  shutil.copy(reviews_zip, dest / 'drugsCom.zip')
  print(f'kept {len(keep)} of {len(table)} embedding rows; wrote {dest}')


def unpack(src: Path) -> None:
  cache = assets.cache_dir()
  model_dir = cache / 'all-MiniLM-L6-v2'
  model_dir.mkdir(parents=True, exist_ok=True)
  with gzip.open(src / 'model.safetensors.gz', 'rb') as f, open(
      model_dir / 'model.safetensors', 'wb') as out:
    shutil.copyfileobj(f, out)
  for name in ('config.json', 'tokenizer.json'):
    shutil.copy(src / name, model_dir / name)
  (cache / 'drugreview').mkdir(parents=True, exist_ok=True)
  shutil.copy(src / 'drugsCom.zip', cache / 'drugreview' / 'drugsCom.zip')
  print(f'unpacked into {cache}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('action', choices=('pack', 'unpack'),
                      help='pack here, or unpack on the offline machine')
  parser.add_argument('dir', type=Path, help='folder of the packed assets')
  args = parser.parse_args()
  (pack if args.action == 'pack' else unpack)(args.dir)


if __name__ == '__main__':
  main()
