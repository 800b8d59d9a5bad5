"""Progress bars on a terminal only.

tqdm redraws its line with carriage returns; a log redirected to a file keeps every redraw. Off a terminal the bars stay
off and the per-epoch line of `engine.fit` is the progress report.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable

from tqdm import tqdm


def bar(iterable: Iterable, desc: str, show: bool = True, **options) -> tqdm:
    """`iterable` with a bar on stderr when stderr is a terminal and `show` (e.g. rank 0 only); tqdm's own defaults
    hold otherwise, so TQDM_DISABLE=1 still turns bars off."""
    options = {"leave": False, "dynamic_ncols": True, "mininterval": 1.0, **options}
    if not (show and sys.stderr.isatty()):
        options["disable"] = True
    return tqdm(iterable, desc=desc, file=sys.stderr, **options)
