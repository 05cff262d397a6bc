"""The smallest child of :func:`~benchmarks.toolkit.isolation.run_isolated`.

Writes back what it was given (its arguments, chosen environment variables,
its working directory), or fails or hangs on request, so that the isolation
can be checked without starting JAX.

Usage::

  python -m benchmarks.toolkit.echo [WORD ...] [--env NAME ...] \\
      [--fail CODE] [--sleep SECONDS] --result-json FILE
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from benchmarks.toolkit import isolation
from benchmarks.toolkit import results


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('words', nargs='*', help='Echoed back.')
  parser.add_argument('--env', nargs='*', default=[],
                      help='Environment variables to echo back.')
  parser.add_argument('--fail', type=int, default=None, metavar='CODE',
                      help='Write no result; print to stderr and exit CODE.')
  parser.add_argument('--sleep', type=float, default=0.0,
                      help='Seconds to wait first.')
  parser.add_argument(isolation.RESULT_FLAG, dest='result_json',
                      required=True, help='Write the result here.')
  args = parser.parse_args(argv)
  time.sleep(args.sleep)
  if args.fail is not None:
    print(f'echo: failing with exit code {args.fail}', file=sys.stderr)
    sys.exit(args.fail)
  results.write_json({'words': args.words,
                      'env': {k: os.environ.get(k) for k in args.env},
                      'cwd': os.getcwd()}, args.result_json)


if __name__ == '__main__':
  main()
