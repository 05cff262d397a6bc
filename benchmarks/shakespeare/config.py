"""Settings of the Shakespeare benchmark: one frozen dataclass, two presets.

``main.py`` reads :class:`Config` with ``tyro``: ``--preset NAME`` picks the
defaults from :data:`PRESETS` and every field is a flag that overrides it::

  python -m benchmarks.shakespeare.main --preset tiny --out /tmp/shk
  python -m benchmarks.shakespeare.main --preset h200 --out DIR \\
      --methods adamw mlorc_adamw_r4 'mlorc_adamw_r4:complement=0'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Literal

#: The methods of the full comparison (``methods.py`` spells the syntax):
#: MLorc at the library defaults and as the paper's Algorithm 1 with its
#: b1=0.8 (the options of ``mlorc_optax.PAPER_ADAMW``).
PAPER_ADAMW_OPTIONS = 'b1=0.8,complement=0,oversample=0,update_bound=none'
DEFAULT_METHODS = (
    'adamw',
    'mlorc_adamw_r4',
    f'mlorc_adamw_r4:{PAPER_ADAMW_OPTIONS}',
    'mlorc_adamw_r8',
    f'mlorc_adamw_r8:{PAPER_ADAMW_OPTIONS}',
    'galore_r4',
    'adafactor',
    'lion',
    'mlorc_lion_r4',
)

#: Held-out works that the final numbers are measured on (a tragedy, a
#: comedy, a history and a romance; 517 kB, 10% of the corpus).
VALIDATION_WORKS = ('hamlet', 'richard_ii', 'tempest', 'twelfth_night')
#: Held-out works that choose each method's learning rate (363 kB).
TUNING_WORKS = ('henry_iv_part_1', 'macbeth', 'much_ado_about_nothing')


@dataclasses.dataclass(frozen=True)
class Config:
  """One run of the benchmark.

  Attributes:
    methods: method specs (``methods.py``), in table order; ``adamw`` is
      the baseline of the paired differences.
    lr_multipliers: the learning-rate grid, as multiples of each method's
      reference rate (``methods.BASES``, or ``:lr=`` in its spec).
    seeds: seeds of the final runs (parameters, batch order, sketches); the
      first one also tunes the learning rate.
    protocol: ``two_phase``: tune (grid x first seed), then run the chosen
      rate with the other seeds (the tuning run is reused for the first);
      ``grid``: every (rate, seed) at once, one compiled step per method,
      the rate still chosen with the first seed's tuning loss.
    lanes: most runs trained together in one vmapped step (0: all runs of a
      method's phase).
    jobs: methods trained concurrently (threads; on a GPU one method
      compiles while another trains).
    validation_works: work ids held out for the final numbers.
    tuning_works: work ids held out for choosing the learning rate.
    works: work ids to read (empty: every work).
    max_work_bytes: keep the first this many bytes of each work (0: all).
    cache: asset cache folder (None: ``$MLORC_OPTAX_CACHE`` or
      ``~/.cache/mlorc_optax``).
    dim: model width.
    n_layers: decoder blocks.
    n_heads: attention heads (key/value heads too).
    ffn_dim: SwiGLU hidden width.
    compute_dtype: activations and matmuls (parameters stay float32).
    seq_len: bytes predicted per sequence.
    batch_size: sequences per step and run.
    steps: training steps per run (a multiple of ``eval_every``).
    warmup_steps: linear warm-up steps.
    schedule: decay after warm-up: cosine or linear, to
      ``min_lr_ratio`` times the peak.
    min_lr_ratio: the final learning rate over the peak.
    grad_clip: global-norm clip before every method (0: none).
    eval_every: steps between points of the validation curves.
    curve_windows: validation windows scored at each curve point.
    eval_batch_size: windows per evaluation batch.
    out: output folder (results.json, results.md, curves.png).
    resume: keep the runs already in ``out/results.json`` and run only the
      missing ones (``--no-resume`` after a library change starts over).
    merge: result files whose runs are added before running (runs already
      there are not run again; same setup required).
    result_json: also write the results here (``run_isolated``'s flag).
  """

  methods: tuple[str, ...] = DEFAULT_METHODS
  lr_multipliers: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)
  seeds: tuple[int, ...] = (0, 1, 2)
  protocol: Literal['two_phase', 'grid'] = 'two_phase'
  lanes: int = 0
  jobs: int = 1
  validation_works: tuple[str, ...] = VALIDATION_WORKS
  tuning_works: tuple[str, ...] = TUNING_WORKS
  works: tuple[str, ...] = ()
  max_work_bytes: int = 0
  cache: str | None = None
  dim: int = 512
  n_layers: int = 6
  n_heads: int = 8
  ffn_dim: int = 1376
  compute_dtype: Literal['float32', 'bfloat16'] = 'bfloat16'
  seq_len: int = 256
  batch_size: int = 24
  steps: int = 500
  warmup_steps: int = 50
  schedule: Literal['cosine', 'linear'] = 'cosine'
  min_lr_ratio: float = 0.1
  grad_clip: float = 1.0
  eval_every: int = 100
  curve_windows: int = 128
  eval_batch_size: int = 64
  out: str = 'benchmarks/results/shakespeare'
  resume: bool = True
  merge: tuple[str, ...] = ()
  result_json: str | None = None

  def __post_init__(self):
    if not self.methods or not self.seeds or not self.lr_multipliers:
      raise ValueError('methods, seeds and lr_multipliers must be non-empty.')
    if self.steps < 1 or self.steps % self.eval_every:
      raise ValueError(f'steps ({self.steps}) must be a positive multiple of '
                       f'eval_every ({self.eval_every}).')
    if not 0 <= self.warmup_steps < self.steps:
      raise ValueError(f'warmup_steps ({self.warmup_steps}) must be in '
                       f'[0, steps).')
    if self.lanes < 0 or self.jobs < 1:
      raise ValueError(f'lanes ({self.lanes}) must be >= 0 and jobs '
                       f'({self.jobs}) >= 1.')
    if len(set(self.methods)) != len(self.methods):
      raise ValueError(f'methods {self.methods} name one method twice.')

  def setup(self) -> dict[str, object]:
    """The fields a run's numbers depend on (not which runs are made)."""
    skip = {'methods', 'lr_multipliers', 'seeds', 'protocol', 'lanes',
            'jobs', 'cache', 'out', 'resume', 'merge', 'result_json'}
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if f.name not in skip}

  def setup_digest(self) -> str:
    """A short hash of :meth:`setup` (runs merge only when it matches)."""
    text = json.dumps(self.setup(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


#: ``tiny``: CPU, CI (a ~110k-parameter model, two methods, two works'
#: first 16 kB each held out). ``h200``: a ~19M-parameter model on one H200
#: for the nine default methods (see README.md for the time estimate).
PRESETS: dict[str, Config] = {
    'tiny': Config(
        methods=('adamw', 'mlorc_adamw_r4'),
        lr_multipliers=(1.0, 4.0),
        seeds=(0, 1),
        protocol='grid',
        validation_works=('hamlet',),
        tuning_works=('macbeth',),
        works=('hamlet', 'lear', 'macbeth', 'othello', 'sonnets', 'tempest'),
        max_work_bytes=16_000,
        dim=64,
        n_layers=2,
        n_heads=4,
        ffn_dim=128,
        compute_dtype='float32',
        seq_len=64,
        batch_size=8,
        steps=40,
        warmup_steps=4,
        eval_every=20,
        curve_windows=32,
        eval_batch_size=32,
        out='/tmp/shakespeare_tiny',
    ),
    'h200': Config(jobs=3),
}
