"""Fixtures shared by the library tests."""

import pytest

from helpers import make_params


@pytest.fixture
def params():
  """The mixed parameter tree of ``helpers.make_params``."""
  return make_params()
