"""Where an MLorc step's time goes: its dense products and small factorizations.

The randomized SVD of one moment ``M [batch, m, n]`` at rank ``r`` (sketch
width ``l = r + oversample``) is: the sketch ``Y = M Omega`` (``[m, l]``), an
orthonormal basis ``Q`` of ``Y`` (QR of a tall, thin matrix), ``B = Q^T M``
(``[l, n]``) and the SVD of the short, wide ``B``. This times each piece on the
device with the library's way (``jnp.linalg.qr`` / ``jnp.linalg.svd``) next
to a matmul-only alternative (CholeskyQR2; the SVD of ``B`` from the
eigendecomposition of the ``l x l`` Gram matrix ``B B^T``, as the two-pass
step's :func:`mlorc_optax.kernels.svds_of_projections` does) and to what
``mlorc_optax``'s reference step does (a QR of ``B^T``, then the SVD of the
``l x l`` factor: :func:`qr_then_small_svd`), and the two streaming products
next to a plain copy of ``M`` (the bandwidth floor), all in one process.

Usage::

  python -m benchmarks.decompositions --batch 8 --ranks 4 32 \\
      --json benchmarks/results/decompositions/h100.json
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import tyro

from benchmarks.toolkit import results as results_lib
from benchmarks.toolkit import timing

SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096))


@dataclasses.dataclass(frozen=True)
class Config:
  """Where an MLorc step's time goes: its dense products and factorizations."""

  batch: int = 8
  """Matrices per stack (layers)."""
  shapes: tuple[tuple[int, int], ...] = SHAPES
  """Matrix shapes ``M N`` (default: LLaMA-7B's)."""
  ranks: tuple[int, ...] = (4, 32)
  """Sketch widths."""
  calls: int = 10
  """Timed calls (median)."""
  json: str | None = None
  """Write the results here (after every entry)."""


def median_ms(fn, *args, calls: int) -> float:
  """Milliseconds: the median of ``calls`` warm calls of ``jit(fn)(*args)``."""
  return 1e3 * timing.time_calls(jax.jit(fn), *args, calls=calls).median_s


def _mT(x):
  return jnp.swapaxes(x, -1, -2)


def cholesky_qr2(y: jax.Array) -> jax.Array:
  """Orthonormal basis of ``y [..., m, l]`` by two CholeskyQR passes."""
  for _ in range(2):
    gram = _mT(y) @ y
    shift = 1e-6 * jnp.trace(gram, axis1=-2, axis2=-1)[..., None, None]
    chol = jnp.linalg.cholesky(gram + shift * jnp.eye(gram.shape[-1]))
    y = _mT(jax.scipy.linalg.solve_triangular(chol, _mT(y), lower=True))
  return y


def qr_then_small_svd(b: jax.Array):
  """SVD ``(u, s, vt)`` of a short, wide ``b [..., l, n]`` through a QR.

  ``b^T = Q_b R_b`` (Householder), then the SVD of the small ``R_b^T = U S
  W^T`` gives ``b = U S (Q_b W)^T``: how the reference step of
  :func:`mlorc_optax.randomized_svd` factorizes ``B = Q^T A`` (the only
  decomposition of a long matrix is a QR).
  """
  q_b, r_b = jnp.linalg.qr(_mT(b))
  u, s, wt = jnp.linalg.svd(_mT(r_b), full_matrices=False)
  return u, s, jnp.matmul(wt, _mT(q_b), precision=jax.lax.Precision.HIGHEST)


def gram_svd(b: jax.Array):
  """SVD of a short, wide ``b [..., l, n]`` from ``eigh(b b^T)``."""
  w, u = jnp.linalg.eigh(b @ _mT(b))
  s = jnp.sqrt(jnp.maximum(w, 0.0))
  v = _mT(b) @ u / jnp.where(s > 0, s, 1.0)[..., None, :]
  return u, s, v


def run(batch: int, ranks: Sequence[int], calls: int,
        json_path: str | None = None,
        shapes: Sequence[tuple[int, int]] = SHAPES) -> list[dict[str, Any]]:
  """Times every shape and rank; rewrites ``json_path`` after each."""
  results = []
  key = jax.random.key(0)
  for m, n in shapes:
    big = jax.random.normal(key, (batch, m, n), jnp.float32)
    row = dict(m=m, n=n, batch=batch)
    row['copy_ms'] = median_ms(lambda a: a * 1.0, big, calls=calls)
    for r in ranks:
      omega = jax.random.normal(key, (n, r), jnp.float32)
      y = big @ omega
      q = jnp.linalg.qr(y)[0]
      b = _mT(q) @ big
      entry = dict(row, rank=r)
      entry['sketch_ms'] = median_ms(lambda a, o: a @ o, big, omega,
                                     calls=calls)
      entry['project_ms'] = median_ms(lambda q, a: _mT(q) @ a, q, big,
                                      calls=calls)
      entry['qr_ms'] = median_ms(lambda y: jnp.linalg.qr(y)[0], y,
                                 calls=calls)
      entry['cholesky_qr2_ms'] = median_ms(cholesky_qr2, y, calls=calls)
      entry['svd_ms'] = median_ms(
          lambda b: jnp.linalg.svd(b, full_matrices=False), b, calls=calls)
      entry['gram_svd_ms'] = median_ms(gram_svd, b, calls=calls)
      entry['qr_then_small_svd_ms'] = median_ms(
          qr_then_small_svd, b, calls=calls)  # the reference step's way
      q2 = cholesky_qr2(y)
      entry['cholesky_qr2_orthogonality'] = float(jnp.max(jnp.abs(
          _mT(q2) @ q2 - jnp.eye(r))))
      u, s, v = gram_svd(b)
      entry['gram_svd_rel_error'] = float(
          jnp.linalg.norm((u * s[..., None, :]) @ _mT(v) - b)
          / jnp.linalg.norm(b))
      entry['copy_ms'] = row['copy_ms']
      entry.update(device=jax.local_devices()[0].device_kind,
                   jax_version=jax.__version__)
      results.append(entry)
      print(json.dumps(entry), flush=True)
      if json_path:  # after every entry: a cut-off run keeps data
        results_lib.write_json(results, json_path)
  return results


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
  cfg = tyro.cli(Config, args=argv)
  return run(cfg.batch, cfg.ranks, cfg.calls, cfg.json, cfg.shapes)


if __name__ == '__main__':
  main()
