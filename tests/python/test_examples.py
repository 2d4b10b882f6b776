"""The examples under python/examples run and check themselves (examples double as tests)."""

import os
import runpy

import pytest

from conftest import REPO

EXAMPLES = os.path.join(REPO, "python", "examples")


@pytest.mark.parametrize("name", ["quickstart.py", "vllm_experts.py"])
def test_example(name, capsys):
    module = runpy.run_path(os.path.join(EXAMPLES, name))
    assert module["main"]() == 0
    assert capsys.readouterr().out.strip()
