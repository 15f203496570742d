"""Entry point for `python facegan_dist ...`, `python -m facegan_dist ...` and
`accelerate launch facegan_dist train ...`.

Run as a folder (what `accelerate launch facegan_dist` does) this file is a plain script and
sys.path[0] is the package folder itself, so a module in here (e.g. `config.py`) could shadow a
top-level module of the same name. Put the repo root first and import absolutely.
"""

import os
import sys

if __package__ in (None, ""):
    _here = os.path.dirname(os.path.abspath(__file__))
    _root = os.path.dirname(_here)
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    sys.path.insert(0, _root)

from facegan_dist.cli import main  # noqa: E402

if __name__ == "__main__":
    main()
