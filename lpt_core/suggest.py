"""The "did you mean" of every error that names an unknown key, option, ablation or model: one wording for all."""
from __future__ import annotations

import difflib
from typing import Iterable


def did_you_mean(name: str, valid: Iterable[str], *, prefix: str = "", what: str = "keys",
                 list_all: bool = False) -> str:
    """`did you mean '<prefix><closest>'?` when a valid name is close to `name`, else `valid <what>: a, b, ...`.

    prefix: what the valid names sit under (`data.`), so the suggestion is the whole key a user types.
    list_all: name every valid one after the suggestion too (short registries a user browses, e.g. ablations)."""
    valid = [str(v) for v in valid]
    listing = f"valid {what}: {', '.join(valid)}"
    close = difflib.get_close_matches(str(name), valid, n=1)
    if not close:
        return listing
    return f"did you mean '{prefix}{close[0]}'?" + (f" ({listing})" if list_all else "")
