"""Fixtures of the curvature tests; the problems themselves live in ``_problems.py``."""

import pytest

from ._problems import Problem, make_problem


@pytest.fixture
def mlp_problem() -> Problem:
    return make_problem("mlp")


@pytest.fixture
def cnn_problem() -> Problem:
    return make_problem("cnn")
