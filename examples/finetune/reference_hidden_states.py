"""Write a PyTorch/transformers reference fixture for the Flax NNX BERT port.

Run on a machine with ``torch`` and ``transformers`` installed (they are *not*
dependencies of this project); from the repository root::

    python -m examples.finetune.reference_hidden_states \\
        tests/examples/fixtures/minilm_hidden_states.npz [--model-dir DIR]

``DIR`` defaults to the cached all-MiniLM-L6-v2 checkpoint (fetched by
:func:`examples.finetune.assets.fetch_minilm`). The model runs in float32 on
the CPU by default (eager attention, TF32 disabled) so that the fixture is an
exact float32 reference.

Fixture format (``.npz``, no pickles), read by
:func:`load_hidden_state_fixture`:

* ``sentences``: ``(4,)`` unicode strings (:data:`REFERENCE_SENTENCES`);
* ``input_ids``, ``attention_mask``, ``token_type_ids``: ``(4, L)`` int32, from
  the Hugging Face tokenizer, padded to the longest sentence;
* ``last_hidden_state``: ``(4, L, 384)`` float32 ``BertModel`` output;
* ``versions``: a string with the torch/transformers versions used.

This module imports only numpy at import time, so the loader works without
torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence, Union

import numpy as np

PathLike = Union[str, os.PathLike]

REFERENCE_SENTENCES: tuple[str, ...] = (
    'A man is eating food.',
    'The girl is carrying a baby.',
    'I have suffered with migraines for over 40 years; this medicine finally '
    'helped, although the side effects (nausea, dizziness) were bad at first.',
    'hello world',
)
"""Four sentences of different lengths, so that the batch contains padding."""

FIXTURE_KEYS: tuple[str, ...] = (
    'sentences',
    'input_ids',
    'attention_mask',
    'token_type_ids',
    'last_hidden_state',
)
"""Arrays every fixture must contain."""


def load_hidden_state_fixture(path: PathLike) -> dict[str, np.ndarray]:
  """Reads and validates a fixture written by this script.

  Returns:
    ``{key: array}`` for :data:`FIXTURE_KEYS`; ids/masks as int32 and
    ``last_hidden_state`` as float32.
  """
  with np.load(path, allow_pickle=False) as npz:
    missing = [k for k in FIXTURE_KEYS if k not in npz.files]
    if missing:
      raise KeyError(f'{path}: missing arrays {missing}')
    out = {k: npz[k] for k in FIXTURE_KEYS}
  for k in ('input_ids', 'attention_mask', 'token_type_ids'):
    out[k] = out[k].astype(np.int32)
  out['last_hidden_state'] = out['last_hidden_state'].astype(np.float32)
  b, n = out['input_ids'].shape
  if (
      len(out['sentences']) != b
      or out['attention_mask'].shape != (b, n)
      or out['token_type_ids'].shape != (b, n)
      or out['last_hidden_state'].shape[:2] != (b, n)
  ):
    raise ValueError(f'{path}: inconsistent array shapes')
  return out


def compute_reference(
    model_dir: PathLike,
    sentences: Sequence[str] = REFERENCE_SENTENCES,
    device: str = 'cpu',
) -> dict[str, np.ndarray]:
  """Runs ``transformers.BertModel`` (float32) on ``sentences``: the fixture."""
  import torch
  import transformers
  from transformers import AutoTokenizer, BertModel

  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
  model = BertModel.from_pretrained(str(model_dir), attn_implementation='eager')
  model = model.float().to(device).eval()
  batch = tokenizer(list(sentences), padding=True, return_tensors='pt')
  with torch.no_grad():
    hidden = model(
        **{k: v.to(device) for k, v in batch.items()}
    ).last_hidden_state
  return {
      'sentences': np.asarray(list(sentences), dtype=np.str_),
      'input_ids': batch['input_ids'].numpy().astype(np.int32),
      'attention_mask': batch['attention_mask'].numpy().astype(np.int32),
      'token_type_ids': batch['token_type_ids'].numpy().astype(np.int32),
      'last_hidden_state': hidden.float().cpu().numpy(),
      'versions': np.asarray(
          f'torch={torch.__version__} transformers={transformers.__version__}'
      ),
  }


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
      'output', type=Path, help='path of the .npz fixture to write'
  )
  parser.add_argument(
      '--model-dir',
      type=Path,
      default=None,
      help='checkpoint directory (default: fetch into the cache)',
  )
  parser.add_argument(
      '--device', default='cpu', help='torch device (default: cpu)'
  )
  args = parser.parse_args(argv)

  model_dir = args.model_dir
  if model_dir is None:
    sys.path.insert(
        0, str(Path(__file__).resolve().parents[2])
    )  # Repository root.
    from examples.finetune.assets import fetch_minilm

    model_dir = fetch_minilm()
  arrays = compute_reference(model_dir, device=args.device)
  args.output.parent.mkdir(parents=True, exist_ok=True)
  np.savez(args.output, **arrays)
  load_hidden_state_fixture(args.output)  # Round-trip check.
  print(
      f'wrote {args.output}: last_hidden_state'
      f" {arrays['last_hidden_state'].shape}, "
      f"{arrays['versions']}"
  )


if __name__ == '__main__':
  main()
