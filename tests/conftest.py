"""Shared helpers: the official fixtures (tests/fixtures/official), loaded through the public API."""
import json
from functools import lru_cache
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "official"

torch.set_num_threads(2)   # the fixtures were recorded with 2 intra-op threads


@lru_cache(maxsize=None)
def reference(case: str) -> dict:
    return torch.load(FIXTURES / case / "reference.pt", weights_only=True)


@lru_cache(maxsize=None)
def official_flags(case: str) -> dict:
    return json.loads((FIXTURES / case / "config.json").read_text())["official_flags"]


def load_case(case: str, **overrides):
    """``load_official`` on a fixture's model.pt with its recorded official flags (+ overrides)."""
    from checkpoints_convert import load_official
    flags = dict(official_flags(case), **overrides)
    return load_official(FIXTURES / case / "model.pt", flags)


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture
def one_thread():
    """One intra-op thread for the small demo models (2 threads on a busy 2-core machine stall in
    OpenMP barriers); the suite's setting above is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fixtures_dir():
    return FIXTURES


def one_line_error_check(prog: str):
    """An assert for the CLIs' error contract: exit status 2 and one line ``{prog}: error: ...`` holding
    every fragment, no traceback. Used as ``assert_one_line_error(code, err, *fragments)``."""
    def assert_one_line_error(code, err, *fragments):
        assert code == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1, err
        assert lines[0].startswith(f"{prog}: error: "), err
        assert "Traceback" not in err
        for fragment in fragments:
            assert fragment in lines[0], lines[0]
    return assert_one_line_error
