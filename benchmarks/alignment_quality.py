"""The alignment-quality benchmark (``jaxpo bench quality``), full size, into benchmarks/results.

    python benchmarks/alignment_quality.py                  # FULL: 3 tasks x 3 seeds, ~40 min
    python benchmarks/alignment_quality.py --quick          # QUICK: the sort task, <= 15 min
    python benchmarks/alignment_quality.py --workdir=/tmp/aq   # where the runs go

Writes ``benchmarks/results/alignment_quality.{json,md,png}`` and, for the full run, the
measured part of "Which objective for which data" in docs/losses.md
(``jaxpo.bench.quality.update_docs``); a test checks that the two agree.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # uninstalled
from jaxpo.bench import quality

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DOCS = os.path.join(ROOT, "docs", "losses.md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick size")
    parser.add_argument("--workdir", default=None, help="the runs' directory")
    parser.add_argument("--out", default=RESULTS, help="where the results go")
    args = parser.parse_args()
    results = quality.run(args.out, quality.QUICK if args.quick else quality.FULL,
                          workdir=args.workdir)
    print(quality.markdown(results))
    if args.out == RESULTS and not args.quick:  # the committed results: the docs follow them
        quality.update_docs(DOCS, results)


if __name__ == "__main__":
    main()
