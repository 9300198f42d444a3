"""Sun & Raskutti's section 7 end to end: `minintk paper` as a script (same flags; --help lists them).

  python scripts/reproduce_paper.py --preset quick          # ~3 minutes on 2 CPU cores
  python scripts/reproduce_paper.py                         # the committed CPU report, < 30 minutes
  python scripts/reproduce_paper.py --model random:125M --pretrain-steps 600 --device cuda --data-dir .paper_data

Works from a checkout without `pip install` (it puts the repository on sys.path).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minintk.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["paper", *sys.argv[1:]]))
