"""benchmarks/update_ab.py: the compiled update of a git revision against the working tree's, same results first."""
import types

import pytest

from conftest import load_script
from keras_rigl import compiled_update


def test_the_same_revision_gives_the_same_result_and_ratios():
    ab = load_script("benchmarks/update_ab.py")
    result = ab.main(["--against", "HEAD", "--model", "cnn", "--rounds", "1"])
    for clock in ("wall", "cpu"):
        assert set(result[clock]) == {"min_ratio", "median_ratio"}
        assert all(0 < v < float("inf") for v in result[clock].values())


def test_an_update_with_other_results_is_reported_and_not_timed(monkeypatch, capsys):
    ab = load_script("benchmarks/update_ab.py")
    # a "baseline" that grows at random instead of by the gradient: other masks from the same state and seeds
    other = types.SimpleNamespace(CompiledUpdate=lambda *a, **k: compiled_update.CompiledUpdate(
        *a, **{**k, "grow_by": "random"}))
    monkeypatch.setattr(ab, "load_revision", lambda rev: other)
    assert ab.main(["--against", "HEAD", "--model", "cnn", "--rounds", "1"]) == 1
    out = capsys.readouterr().out
    assert "DIFFERENT results" in out and "time," not in out


def test_a_revision_git_does_not_have_exits_naming_the_fix():
    ab = load_script("benchmarks/update_ab.py")
    with pytest.raises(SystemExit) as exc:
        ab.main(["--against", "no-such-revision-xyz", "--model", "cnn"])
    assert "--against 'no-such-revision-xyz'" in str(exc.value) and "HEAD~1" in str(exc.value)
