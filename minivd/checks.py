"""Checks of the values a config gives, one call per value: its type and its range, or a ValueError naming the key.

Every config dataclass checks its fields with these in `__post_init__`, however it was made (a checkpoint's config
file, `tiny()`, user code); the checkpoint reader adds the file's path to the message. A key is named as the files
name it: "heads (attention_head_dim)" is the field `heads`, read from diffusers' key `attention_head_dim`.
"""

import math
import numbers


def span(low, high):
    return f">= {low}" if high is None else f"in [{low}, {high}]"


def integer(value, key, low=1, high=None):
    """An int (not a bool) in [low, high]; high None: no upper bound."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low \
            or (high is not None and value > high):
        raise ValueError(f"{key} must be an integer {span(low, high)}, got {value!r}")
    return value


def real(value, key, low=None, high=None, positive=False):
    """A finite number (not a bool) in [low, high]; positive: above 0."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (low is not None and value < low) or (high is not None and value > high) or (positive and value <= 0):
        want = "a number > 0" if positive else "a finite number" + (f" {span(low, high)}" if low is not None else "")
        raise ValueError(f"{key} must be {want}, got {value!r}")
    return value


def flag(value, key):
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be true or false, got {value!r}")
    return value


def integers(value, key, low=1, high=None, count=(1, None)):
    """A list or tuple of count[0]..count[1] integers, each in [low, high]."""
    shortest, longest = count
    if not isinstance(value, (list, tuple)) or len(value) < shortest or (longest is not None and len(value) > longest):
        raise ValueError(f"{key} must be a list of {shortest} to {longest or 'any number of'} integers, got {value!r}")
    for i, item in enumerate(value):
        integer(item, f"{key}[{i}]", low, high)
    return value


def choice(value, key, allowed):
    if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
        raise ValueError(f"{key}={value!r} is not supported (minivd implements {' or '.join(map(repr, allowed))})")
    return value
