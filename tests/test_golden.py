"""The refactored code reproduces the outputs recorded before it moved (tests/golden.py): for every
method and for a 2-worker run, the same saved weights (sha256) and the same evaluation metrics."""

import json

import pytest

from golden import CASES, GOLDEN_FILE, run_case
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
    assert got["losses"] == pytest.approx(want["losses"], abs=1e-6)
    assert got["metrics"] == pytest.approx(want["metrics"], abs=1e-9)
    assert got["weights"] == want["weights"], "saved weights differ bit for bit from the recorded ones"
