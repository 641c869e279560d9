"""The experiment and benchmark scripts stay runnable: each one compiles on this Python."""

import py_compile
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "experiments").rglob("*.py"))


def test_there_are_scripts():
    assert any(p.name == "bench_train.py" for p in SCRIPTS)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_compiles(script, tmp_path):
    # doraise: a SyntaxError (e.g. an f-string that only Python 3.12 accepts) fails the test
    py_compile.compile(str(script), cfile=str(tmp_path / "x.pyc"), doraise=True)
