"""mlorc_optax.flax: matrix views, factor names and boxes of Linen trees.

The tree is Flaxformer-shaped: ``nn.scan``-stacked layers with multi-axis
``DenseGeneral`` attention kernels, named with ``nn.with_logical_partitioning``
(T5X names). The sharding tests run on the 8 simulated CPU devices of the
root conftest.py.
"""

import functools

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import mlorc_optax
import mlorc_optax.flax

E, H, D, F, L, V = 32, 4, 8, 48, 2, 40
RANK = 4
RULES = (('batch', 'data'), ('embed', 'data'), ('heads', 'model'),
         ('mlp', 'model'), ('vocab', 'model'), ('kv', None), ('layers', None))


def _init(*names):
  return nn.with_logical_partitioning(
      nn.initializers.normal(E**-0.5), names)


class Layer(nn.Module):

  @nn.compact
  def __call__(self, x, _):
    h = nn.RMSNorm(scale_init=nn.with_logical_partitioning(
        nn.initializers.ones, ('embed',)), name='norm')(x)
    q, k, v = (nn.DenseGeneral((H, D), use_bias=False, name=n,
                               kernel_init=_init('embed', 'heads', 'kv'))(h)
               for n in ('query', 'key', 'value'))
    w = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / D**0.5)
    y = jnp.einsum('bhqk,bkhd->bqhd', w, v)
    x = x + nn.DenseGeneral(E, axis=(-2, -1), use_bias=False, name='out',
                            kernel_init=_init('heads', 'kv', 'embed'))(y)
    h = nn.gelu(nn.Dense(F, use_bias=False, name='wi',
                         kernel_init=_init('embed', 'mlp'))(x))
    return x + nn.Dense(E, use_bias=False, name='wo',
                        kernel_init=_init('mlp', 'embed'))(h), None


class Decoder(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(V, E, name='embed', embedding_init=_init('vocab', 'embed'))(
        tokens)
    x, _ = nn.scan(Layer, variable_axes={'params': 0},
                   split_rngs={'params': True}, length=L,
                   metadata_params={nn.PARTITION_NAME: 'layers'})(
                       name='layers')(x, None)
    return nn.Dense(V, use_bias=False, name='head',
                    kernel_init=_init('embed', 'vocab'))(x)


MODEL = Decoder()
TOKENS = jax.random.randint(jax.random.key(1), (8, 9), 0, V)
BOXED = MODEL.init(jax.random.key(0), TOKENS[:, :-1])['params']
NAMES = nn.get_partition_spec(BOXED)
PARAMS = nn.unbox(BOXED)
DIMS = mlorc_optax.flax.logical_dimension_numbers(NAMES)


def loss_fn(params, tokens=TOKENS):
  logits = MODEL.apply({'params': params}, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, tokens[:, 1:]).mean()


# One compiled forward/backward pass shared by the training tests; each
# optimizer then compiles only its update (compilation dominates on CPU).
value_and_grad = jax.jit(jax.value_and_grad(loss_fn))


def train(tx, steps, params=PARAMS):
  """(params, losses) after ``steps`` single-device steps from ``params``."""
  state, losses = tx.init(params), []
  update = jax.jit(tx.update)
  for _ in range(steps):
    loss, grads = value_and_grad(params, TOKENS)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    losses.append(loss)
  return params, losses


def leaf_plans(plan):
  """{path: LeafPlan} of a compression_plan (params boxed or not)."""
  return {p.path: p for p in jax.tree.leaves(
      plan, is_leaf=lambda x: isinstance(x, mlorc_optax.plan.LeafPlan))}


def plans(tree=PARAMS, dims=DIMS, **kw):
  tx = mlorc_optax.mlorc_adamw(1e-3, rank=RANK, dimension_numbers=dims, **kw)
  return leaf_plans(mlorc_optax.compression_plan(tx, tree))


def view(plan):
  """(batch, rows, cols) shapes of a plan's view, or None."""
  v = plan.view
  return None if v is None else (v.batch_shape, v.rows, v.cols)


def at(tree, path):
  """The subtree of ``tree`` at ``'a/b/c'``."""
  return functools.reduce(lambda t, k: t[k], path.split('/'), tree)


def is_box(x):
  return isinstance(x, nn.meta.AxisMetadata)


def test_views_follow_the_dense_general_conventions():
  got = {path: view(p) for path, p in plans().items()}
  assert got == {
      # (layers, embed, heads, kv) -> layers x [embed x heads*kv]
      'layers/query/kernel': ((L,), E, H * D),
      'layers/key/kernel': ((L,), E, H * D),
      'layers/value/kernel': ((L,), E, H * D),
      # (layers, heads, kv, embed) -> layers x [heads*kv x embed]
      'layers/out/kernel': ((L,), H * D, E),
      'layers/wi/kernel': ((L,), E, F),
      'layers/wo/kernel': ((L,), F, E),
      'head/kernel': ((), E, V),
      # (layers, embed) is a stack of vectors, not a matrix.
      'layers/norm/scale': None,
      # Embeddings have a view but are compressed only on request.
      'embed/embedding': None,
  }
  assert plans()['layers/norm/scale'].reason == (
      'dimension_numbers gives no matrix view')
  opt_in = plans(low_rank_mask=mlorc_optax.path_mask(exclude='norm'))
  assert view(opt_in['embed/embedding']) == ((), V, E)
  query = plans()['layers/query/kernel'].view
  assert (query.batch_axes, query.row_axes, query.col_axes) == (
      (0,), (1,), (2, 3))


def test_names_come_from_specs_or_from_the_boxes_alike():
  from_boxes = plans(BOXED, mlorc_optax.flax.logical_dimension_numbers())
  assert {path: view(p) for path, p in from_boxes.items()} == {
      path: view(p) for path, p in plans().items()}
  # So does the plan of the boxed transform (what TrainState.create runs).
  tx = mlorc_optax.flax.boxed(mlorc_optax.mlorc_adamw(
      1e-3, rank=RANK,
      dimension_numbers=mlorc_optax.flax.logical_dimension_numbers()))
  assert leaf_plans(mlorc_optax.compression_plan(tx, BOXED)) == plans()


def test_state_size_is_2_rows_plus_cols_times_r_per_view():
  state = mlorc_optax.mlorc_adamw(1e-3, rank=RANK, dimension_numbers=DIMS
                                  ).init(PARAMS)[0].inner_state
  for path, p in plans().items():
    if not p.compressed:
      continue
    u, s, v = at(state.mu, path)
    batch, m, n = view(p)
    assert u.shape == (*batch, m, RANK) and v.shape == (*batch, n, RANK), path
    assert s.shape == (*batch, RANK), path
    size = sum(x.size for moment in (state.mu, state.nu)
               for x in at(moment, path))
    # 2 moments x (rows + cols) r per matrix, plus the r singular values.
    assert size == 2 * int(np.prod(batch)) * ((m + n) * RANK + RANK), path


def test_state_bytes_in_the_table_are_the_state_bytes():
  tx = mlorc_optax.mlorc_adamw(1e-3, rank=RANK, dimension_numbers=DIMS)
  state = tx.init(PARAMS)
  table = mlorc_optax.flax.format_logical_plan(
      mlorc_optax.compression_plan(tx, PARAMS), NAMES)
  total = int(table.splitlines()[-1].split('|')[6].replace(',', ''))
  counters = state[0].step.nbytes + state[0].sketch_key.nbytes + (
      state[0].inner_state.count.nbytes)
  assert total == sum(x.nbytes for x in jax.tree.leaves(state)) - counters
  assert '| layers/out/kernel | (layers, heads, kv, embed) |' in table
  assert f'layers={L} x [heads*kv={H * D} x embed={E}]' in table
  # The plan of boxed params (boxes around the LeafPlans) gives the same
  # table, and the boxes themselves can give the names.
  boxed_tx = mlorc_optax.flax.boxed(tx)
  assert mlorc_optax.flax.format_logical_plan(
      mlorc_optax.compression_plan(boxed_tx, BOXED), BOXED) == table


def test_full_rank_equals_optax_adamw_on_the_linen_tree():
  kw = dict(learning_rate=1e-2, weight_decay=0.1)
  mask = mlorc_optax.path_mask(include='kernel')
  ours = mlorc_optax.mlorc_adamw(
      **kw, rank=max(E, F, V), dimension_numbers=DIMS, low_rank_mask=mask)
  assert sum(p.compressed for p in plans(low_rank_mask=mask).values()) == 7

  (got, _), (want, _) = train(ours, 10), train(optax.adamw(**kw), 10)
  assert loss_fn(want) < 0.8 * loss_fn(PARAMS)
  # As in test_alias: the factored second moment is exact to float32
  # rounding of its largest entry, so entries whose gradient stays near 0
  # (v below ~1e-6 max v) may drift by a few 1e-4 over 10 steps of 1e-2;
  # 98% of the entries agree to 1e-5.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=5e-4, rtol=0,
                               err_msg=jax.tree_util.keystr(path))
    assert np.mean(np.abs(a - b) <= 1e-5) >= 0.98, jax.tree_util.keystr(path)


def test_factor_names_are_the_names_of_the_axes_they_span():
  p = plans()
  u, s, v, dense = mlorc_optax.flax.factor_logical_axes(
      p['layers/query/kernel'], NAMES['layers']['query']['kernel'])
  assert u == P('layers', 'embed', 'mlorc_rank')
  assert s == P('layers', 'mlorc_rank')
  # heads*kv is one dimension; it takes the major axis' name (kv is never
  # sharded by T5X / MaxText rules, so this is the flattened placement).
  assert v == P('layers', 'heads', 'mlorc_rank')
  assert dense == P('layers', 'embed', 'heads')
  u, _, v, _ = mlorc_optax.flax.factor_logical_axes(
      p['layers/out/kernel'], NAMES['layers']['out']['kernel'])
  assert (u, v) == (P('layers', 'heads', 'mlorc_rank'),
                    P('layers', 'embed', 'mlorc_rank'))
  assert mlorc_optax.flax.RANK_AXIS_NAME == 'mlorc_rank'
  with pytest.raises(ValueError, match='not compressed'):
    mlorc_optax.flax.factor_logical_axes(
        p['layers/norm/scale'], ('layers', 'e'))
  with pytest.raises(ValueError, match='one logical name per axis'):
    mlorc_optax.flax.factor_logical_axes(
        p['layers/query/kernel'], ('embed', 'heads', 'kv'))


def test_factor_names_place_factors_like_factor_partition_specs():
  """Under the rules, logical factor names give factor_partition_specs."""
  for path, plan in plans().items():
    if not plan.compressed:
      continue
    names = at(NAMES, path)
    param_spec = nn.logical_to_mesh_axes(names, RULES)
    want = mlorc_optax.factor_partition_specs(plan, param_spec)
    got = tuple(nn.logical_to_mesh_axes(n, RULES)
                for n in mlorc_optax.flax.factor_logical_axes(plan, names))
    assert got == want, path


def boxed_adamw(**kw):
  return mlorc_optax.flax.boxed(mlorc_optax.mlorc_adamw(
      1e-3, rank=RANK, dimension_numbers=DIMS, **kw))


@pytest.mark.parametrize('make_tx', [
    boxed_adamw,
    # The wrapper finds the MLorc state wherever it sits in the state.
    lambda: mlorc_optax.flax.boxed(optax.inject_hyperparams(
        mlorc_optax.mlorc_adamw, static_args=mlorc_optax.STATIC_ARGS)(
            learning_rate=1e-3, rank=RANK, dimension_numbers=DIMS)),
], ids=['mlorc_adamw', 'inject_hyperparams'])
def test_boxed_init_boxes_each_factor_with_its_names(make_tx):
  state = jax.eval_shape(make_tx().init, BOXED)
  specs = nn.get_partition_spec(state)
  low_rank, = [x for x in jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, mlorc_optax.LowRankMomentsState))
               if isinstance(x, mlorc_optax.LowRankMomentsState)]
  mu = low_rank.inner_state.mu
  query = mu['layers']['query']['kernel']
  assert query.u == P('layers', 'embed', 'mlorc_rank')
  assert query.v == P('layers', 'heads', 'mlorc_rank')
  assert mu['layers']['wo']['kernel'].s == P('layers', 'mlorc_rank')
  assert mu['head']['kernel'].v == P('vocab', 'mlorc_rank')
  # Dense moments keep the parameter's names, as in optax.
  assert mu['embed']['embedding'] == P('vocab', 'embed')
  assert low_rank.inner_state.nu['layers']['norm']['scale'] == P(
      'layers', 'embed')
  # Counters and the key are plain arrays (replicated).
  assert (low_rank.step, low_rank.sketch_key, low_rank.inner_state.count) == (
      P(), P(), P())
  # Every box's names fit its array, which is what nn.get_partition_spec and
  # nn.logical_to_mesh_sharding need (the core alone boxes factors with the
  # parameter's names).
  boxes = jax.tree.leaves(state, is_leaf=is_box)
  # 2 moments x (7 compressed leaves x 3 factors + 2 dense leaves).
  assert sum(map(is_box, boxes)) == 2 * (7 * 3 + 2)
  for box in filter(is_box, boxes):
    assert len(box.names) == box.value.ndim, box


def test_lorapre_factors_of_boxed_params_get_their_row_and_column_names():
  tx = boxed_adamw(compressor=mlorc_optax.contrib.LoRAPreCompressor())
  specs = nn.get_partition_spec(jax.eval_shape(tx.init, BOXED))
  nu = specs[0].inner_state.nu
  # b [layers, rows, r] is laid out like u, a (A transposed) like v.
  assert nu['layers']['query']['kernel'].b == P(
      'layers', 'embed', 'mlorc_rank')
  assert nu['layers']['query']['kernel'].a == P(
      'layers', 'heads', 'mlorc_rank')
  assert nu['head']['kernel'].a == P('vocab', 'mlorc_rank')


@pytest.mark.parametrize('make_tx', [
    mlorc_optax.mlorc_adamw,
    mlorc_optax.mlorc_lion,
    functools.partial(mlorc_optax.mlorc_adamw,
                      compressor=mlorc_optax.contrib.LoRAPreCompressor()),
], ids=['adamw', 'lion', 'lorapre'])
def test_boxed_and_unboxed_updates_agree(make_tx):
  """Params kept boxed (as model.init returns them) or unboxed: same steps."""
  boxed = {'q': BOXED['layers']['query']['kernel'],
           'scale': BOXED['layers']['norm']['scale']}
  dims = mlorc_optax.flax.logical_dimension_numbers(
      nn.get_partition_spec(boxed))
  tx = make_tx(1e-2, rank=RANK, dimension_numbers=dims)
  results = []
  for params, wrapped in ((boxed, mlorc_optax.flax.boxed(tx)),
                          (nn.unbox(boxed), tx)):
    update = jax.jit(wrapped.update)
    state = wrapped.init(params)
    for i in range(2):
      grads = jax.tree.map(lambda x: jnp.cos(x + i), params)
      updates, state = update(grads, state, params)
      params = optax.apply_updates(params, updates)
    results.append((params, state))
  (boxed_params, boxed_state), plain = results
  mu = boxed_state[0].inner_state.mu['q']  # (u, s, v), or LoRA-Pre's (b, a)
  assert mu[0].names == ('layers', 'embed', 'mlorc_rank')  # still boxed
  assert boxed_params['q'].names == ('layers', 'embed', 'heads', 'kv')
  assert jax.tree.structure(nn.unbox(results[0])) == jax.tree.structure(plain)
  for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)


def test_training_the_boxed_model_equals_training_the_unboxed_one():
  """The whole model, a few steps: boxes change no number."""
  tx = mlorc_optax.mlorc_adamw(3e-3, b1=0.8, rank=RANK, dimension_numbers=DIMS)
  got, got_losses = train(mlorc_optax.flax.boxed(tx), 3, params=BOXED)
  want, want_losses = train(tx, 3)
  assert all(is_box(at(got, p)) for p in ('layers/query/kernel', 'head/kernel'))
  np.testing.assert_array_equal(got_losses, want_losses)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_mesh_partitioned_boxes_get_the_factor_partition_specs():
  params = {'w': nn.Partitioned(jnp.ones((L, E, H, D)),
                                (None, 'data', 'model', None))}
  dims = mlorc_optax.flax.logical_dimension_numbers(
      {'w': ('layers', 'embed', 'heads', 'kv')})
  tx = mlorc_optax.flax.boxed(
      mlorc_optax.mlorc_adamw(1e-3, rank=RANK, dimension_numbers=dims))
  specs = nn.get_partition_spec(tx.init(params))[0].inner_state.mu['w']
  assert specs.u == P(None, 'data', None)
  assert specs.v == P(None, 'model', None)
  assert specs.s == P(None, None)


class Tagged(struct.PyTreeNode, nn.meta.AxisMetadata):
  """A box of another kind: metadata that is no axis names."""

  value: object
  tag: str = struct.field(pytree_node=False)

  def unbox(self):
    return self.value

  def replace_boxed(self, val):
    return self.replace(value=val)

  def add_axis(self, index, params):
    return self

  def remove_axis(self, index, params):
    return self


def test_other_boxes_keep_their_dense_moments_boxed_and_factors_plain():
  params = {'w': Tagged(jnp.ones((E, F)), 'x'), 'b': Tagged(jnp.ones(F), 'y')}
  tx = mlorc_optax.flax.boxed(mlorc_optax.mlorc_adamw(1e-2, rank=RANK))
  state = tx.init(params)
  mu = state[0].inner_state.mu
  assert isinstance(mu['w'], mlorc_optax.LowRankFactors)
  assert not any(map(is_box, jax.tree.leaves(mu['w'], is_leaf=is_box)))
  assert mu['b'].tag == 'y'
  grads = jax.tree.map(jnp.cos, params)
  updates, new_state = tx.update(grads, state, params)
  assert (updates['w'].tag, new_state[0].inner_state.nu['b'].tag) == ('x', 'y')
  plain = nn.unbox(params)
  want = mlorc_optax.mlorc_adamw(1e-2, rank=RANK).update(
      jax.tree.map(jnp.cos, plain), tx.init(plain), plain)
  for a, b in zip(jax.tree.leaves((updates, new_state)),
                  jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('names, match', [
    ({'w': P('embed', 'heads', 'mlp')}, 'cannot split'),
    ({'w': P('embed', 'heads')}, 'one per axis'),
    ({'v': P('embed', 'heads', 'kv')}, "no entry for the parameter 'w'"),
])
def test_names_that_do_not_fit_are_errors_naming_the_leaf(names, match):
  dims = mlorc_optax.flax.logical_dimension_numbers(names)
  tx = mlorc_optax.mlorc_adamw(1e-3, rank=1, dimension_numbers=dims)
  with pytest.raises(ValueError, match=match):
    mlorc_optax.compression_plan(tx, {'w': jnp.zeros((8, 4, 2))})


def test_invalid_arguments_name_the_argument():
  with pytest.raises(TypeError, match='batch_names'):
    mlorc_optax.flax.logical_dimension_numbers(NAMES, batch_names='layers')
  with pytest.raises(TypeError, match='joined_names'):
    mlorc_optax.flax.logical_dimension_numbers(
        NAMES, joined_names=('heads', 'kv'))
  with pytest.raises(TypeError, match='unnamed'):
    mlorc_optax.flax.logical_dimension_numbers(NAMES, unnamed=(0, 1))
  with pytest.raises(TypeError, match='logical_axes'):
    mlorc_optax.flax.logical_dimension_numbers({'w': 3})
  with pytest.raises(TypeError, match='GradientTransformation'):
    mlorc_optax.flax.boxed(mlorc_optax.mlorc_adamw)


@pytest.fixture(scope='module')
def mesh():
  assert jax.device_count() >= 8, 'needs the 8 CPU devices of conftest.py'
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ('data', 'model'))


def test_sharded_train_state_is_placed_by_the_rules_and_equals_one_device(
    mesh):
  tx = mlorc_optax.mlorc_adamw(3e-3, b1=0.8, rank=RANK, dimension_numbers=DIMS)

  def init():
    return train_state.TrainState.create(
        apply_fn=MODEL.apply, params=BOXED, tx=mlorc_optax.flax.boxed(tx))

  def step(state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens)
    return state.apply_gradients(grads=grads), loss

  shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(jax.eval_shape(init)), mesh, RULES)
  sharded = jax.jit(init, out_shardings=shardings)()
  mu = sharded.opt_state[0].inner_state.mu
  # u: (layers, embed -> data, rank); v: (layers, heads*kv -> model, rank).
  query = mu['layers']['query']['kernel']
  assert query.u.value.sharding.spec == P(None, 'data', None)
  assert query.v.value.sharding.spec == P(None, 'model', None)
  assert mu['layers']['out']['kernel'].u.value.sharding.spec == P(
      None, 'model', None)
  assert mu['head']['kernel'].v.value.sharding.spec == P('model', None)
  assert mu['embed']['embedding'].value.sharding.spec == P('model', 'data')
  assert sharded.params['layers']['query']['kernel'].value.sharding.spec == P(
      None, 'data', 'model', None)

  sharded_step = jax.jit(step, in_shardings=(
      shardings, NamedSharding(mesh, P('data'))), out_shardings=(
          shardings, None))
  losses = []
  for _ in range(5):
    sharded, loss = sharded_step(sharded, TOKENS)
    losses.append(loss)
  assert sharded.opt_state[0].inner_state.mu['layers']['query'][
      'kernel'].u.value.sharding.spec == P(None, 'data', None)
  # The reference: one device, params not boxed, no TrainState, no wrapper.
  single, single_losses = train(tx, 5)
  np.testing.assert_allclose(losses, single_losses, rtol=1e-5)
  assert losses[-1] < 0.9 * losses[0]
  # Same math in another float32 summation order: as in test_sharding, the
  # only amplified difference is on entries whose v is ~0 (see README).
  for a, b in zip(jax.tree.leaves(nn.unbox(sharded.params)),
                  jax.tree.leaves(single)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    assert np.mean(np.abs(a - b) <= 1e-5) >= 0.99
