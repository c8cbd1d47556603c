import math

import pytest

from granet import checks


def test_each_check_names_the_argument():
    assert checks.choice("x", "a", {"a": 1, "b": 2}) == 1
    with pytest.raises(ValueError, match="x must be one of a, b; got 'c'"):
        checks.choice("x", "c", {"a": 1, "b": 2})
    with pytest.raises(ValueError, match="x must be one of a, b; got \\['a'\\]"):
        checks.choice("x", ["a"], {"a": 1, "b": 2})  # unhashable: still a clear error
    assert checks.integer("n", 3, 1) == 3
    for bad in (True, 1.0, "3", math.inf):
        with pytest.raises(ValueError, match="n must be an integer"):
            checks.integer("n", bad)
    with pytest.raises(ValueError, match="n must be an integer >= 1; got 0"):
        checks.integer("n", 0, 1)
    assert checks.number("f", 1) == 1.0
    for bad in ("0.5", math.nan, None, False):
        with pytest.raises(ValueError, match="f must be a number"):
            checks.number("f", bad)
    with pytest.raises(ValueError, match="f must be finite; got inf"):
        checks.number("f", math.inf)
    fn = len
    assert checks.name_or_callable("s", fn, {"a": 1}) is fn
