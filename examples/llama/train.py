"""Training loop of the LLaMA example: the optimizer and the jitted step.

The optimizer is built by :func:`make_optimizer` and applied by
:func:`train_step`, the first two functions below. The rest is model-agnostic:
:func:`build` makes ``nnx.split((model, nnx.Optimizer(model, tx)))`` in one
jitted program, :func:`jit_train_step` jits the step (state donated, on one
device or with shardings) and :func:`train_steps` runs and times it
(``benchmarks.toolkit.timing``). ``measure.py`` uses them to measure a run.

Entry point: ``python -m examples.llama.main`` (``main.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mlorc_optax
from benchmarks import toolkit
from examples.llama import config as config_lib
from examples.llama import model as model_lib

#: First-moment decay by optimizer when ``Config.b1`` is None (MLorc-AdamW:
#: the paper's 0.8).
DEFAULT_B1 = {'adamw': 0.9, 'mlorc_adamw': 0.8}


def make_optimizer(
    name: str, config: config_lib.Config
) -> optax.GradientTransformation:
  """``optax.adamw`` or ``mlorc_optax.mlorc_adamw`` with the same settings."""
  b1 = DEFAULT_B1[name] if config.b1 is None else config.b1
  if name == 'adamw':
    tx = optax.adamw(config.lr, b1=b1, weight_decay=config.weight_decay)
  elif name == 'mlorc_adamw':
    tx = mlorc_optax.mlorc_adamw(config.lr, b1=b1, rank=config.rank,
                                 weight_decay=config.weight_decay,
                                 seed=config.seed)
  else:
    raise ValueError(
        f"optimizer must be 'adamw' or 'mlorc_adamw', got {name!r}.")
  return with_float32_moments(tx) if config.moment_dtype == 'float32' else tx


def train_step(
    graphdef: nnx.GraphDef, state: nnx.State, tokens: jax.Array, loss_fn: Any
) -> tuple[nnx.State, jax.Array]:
  """One step on ``nnx.split((model, optimizer))``: returns (state, loss)."""
  model, optimizer = nnx.merge(graphdef, state)
  loss, grads = nnx.value_and_grad(loss_fn)(model, tokens)
  optimizer.update(model, grads)  # tx.update + optax.apply_updates
  return nnx.state((model, optimizer)), loss


def with_float32_moments(
    tx: optax.GradientTransformation,
) -> optax.GradientTransformation:
  """Runs ``tx`` on float32 copies of the updates and parameters.

  ``optax.scale_by_adam`` keeps its moments in the parameter dtype, so with
  bfloat16 parameters ``optax.adamw`` has bfloat16 moments. Initialising and
  updating on float32 copies makes every moment float32 (mixed precision
  without float32 master weights); updates are cast back to the dtype of the
  incoming ones.
  """

  def to_f32(tree: Any) -> Any:
    return None if tree is None else jax.tree.map(
        lambda x: x.astype(jnp.float32)
        if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)

  def update_fn(updates, state, params=None):
    new_updates, state = tx.update(to_f32(updates), state, to_f32(params))
    return optax.tree.cast_like(new_updates, updates), state

  return optax.GradientTransformation(lambda p: tx.init(to_f32(p)), update_fn)


def build(
    create_model: Callable[[], nnx.Module],
    tx: optax.GradientTransformation,
    *,
    abstract: bool = False,
) -> tuple[nnx.GraphDef, nnx.State]:
  """``nnx.split((model, nnx.Optimizer(model, tx)))``.

  The concrete state is made by one jitted program, so the device holds only
  the final arrays (no eager temporaries such as the float32 copies of
  :func:`with_float32_moments`); ``abstract=True`` gives
  ``ShapeDtypeStruct`` leaves and allocates nothing.
  """

  def make() -> tuple[nnx.Module, nnx.Optimizer]:
    model = create_model()
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  graphdef, abstract_state = nnx.split(nnx.eval_shape(make))
  if abstract:
    return graphdef, abstract_state
  return graphdef, jax.jit(lambda: nnx.split(make())[1])()


def jit_train_step(
    graphdef: nnx.GraphDef,
    loss_fn: Any = model_lib.cross_entropy_loss,
    shardings: Any = None,
    tokens_sharding: Any = None,
) -> Any:
  """:func:`train_step` jitted as ``(state, tokens) -> (state, loss)``.

  ``state`` is donated. With ``shardings`` (of the state) and
  ``tokens_sharding`` the state keeps its placement and the loss is
  replicated.
  """
  step = lambda state, tokens: train_step(graphdef, state, tokens, loss_fn)
  if shardings is None:
    return jax.jit(step, donate_argnums=0)
  replicated = jax.sharding.NamedSharding(tokens_sharding.mesh,
                                          jax.sharding.PartitionSpec())
  return jax.jit(step, in_shardings=(shardings, tokens_sharding),
                 out_shardings=(shardings, replicated), donate_argnums=0)


def jit_update_step(
    graphdef: nnx.GraphDef, shardings: Any = None, grad_shardings: Any = None
) -> Any:
  """The optimizer update alone, ``(state, grads) -> state`` (donates state)."""

  def update(state: nnx.State, grads: Any) -> nnx.State:
    model, optimizer = nnx.merge(graphdef, state)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer))

  if shardings is None:
    return jax.jit(update, donate_argnums=0)
  return jax.jit(update, in_shardings=(shardings, grad_shardings),
                 out_shardings=shardings, donate_argnums=0)


def optimizer_state_bytes(state: nnx.State) -> int:
  """Bytes of the optimizer state of ``nnx.split((model, optimizer))``."""
  return toolkit.memory.tree_bytes(state[1].get('opt_state', {}))


def train_steps(
    step: Callable[[Any, Any], tuple[Any, jax.Array]],
    state: Any,
    batches: Iterator[np.ndarray],
    *,
    steps: int,
    warmup: int,
    place: Callable[[np.ndarray], Any] = jnp.asarray,
    log: Callable[[str], None] | None = None,
    log_every: int = 0,
) -> tuple[Any, list[float], toolkit.timing.Timing]:
  """Runs ``steps`` calls of ``step(state, place(next(batches)))``.

  Works for any ``(state, tokens) -> (state, loss)`` step that donates its
  state (the Linen example uses it too).

  Args:
    step: the jitted step.
    state: its initial state.
    batches: host batches.
    steps: steps to run (more than ``warmup``).
    warmup: the first steps, not timed (the first one compiles).
    place: puts a host batch on the device(s).
    log: prints a progress line (None: quiet).
    log_every: log the loss every this many steps (0: never).

  Returns:
    ``(state, losses, timing)``: the final state, every step's loss and the
    times of the steps after ``warmup``.

  Raises:
    FloatingPointError: if a loss is not finite.
  """
  if not 0 <= warmup < steps:
    raise ValueError(f'need 0 <= warmup < steps, got {warmup} and {steps}.')
  losses = []

  def one_step(state: Any) -> Any:
    state, loss = step(state, place(next(batches)))
    losses.append(loss)
    i = len(losses) - 1
    if log and log_every and (i % log_every == 0 or i == steps - 1):
      log(f'step {i:5d}  loss {float(loss):.4f}')
    return state

  timing, state = toolkit.timing.time_steps(
      one_step, state, calls=steps - warmup, warmup=warmup)
  losses = [float(x) for x in losses]
  bad = [i for i, x in enumerate(losses) if not math.isfinite(x)]
  if bad:
    raise FloatingPointError(f'loss is {losses[bad[0]]} at step {bad[0]}.')
  return state, losses, timing
