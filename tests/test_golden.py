"""The refactored code reproduces the outputs recorded before it moved (tests/golden.py): for every
method and for a 2-worker run, the same saved weight files and weights, losses and evaluation metrics,
to float32 rounding (float kernels differ between CPU models)."""

import json

import pytest

from golden import CASES, GOLDEN_FILE, assert_recorded, run_case
from helpers import need_shared

pytestmark = pytest.mark.slow

GOLDEN = json.loads(GOLDEN_FILE.read_text())


def test_every_case_is_recorded():
    assert set(GOLDEN) == set(CASES)


@pytest.mark.parametrize("case", sorted(CASES))
def test_outputs_match_the_recorded_ones(case, tiny_llama, toy_data, toy_instruct, tmp_path, ray_session):
    stories = need_shared("models", "stories260K") if CASES[case].get("task") == "causal-lm" else None
    got = run_case(case, tiny_llama, toy_data, stories, toy_instruct, tmp_path)
    want = GOLDEN[case]
    assert got["trainable_params"] == want["trainable_params"]
    assert_recorded(case, got["weights"], got["losses"], got["metrics"])
