"""Ray job entry point: the HTML report of a corpus (same flags as ``reelpack report``).

    ray job submit --working-dir . -- python jobs/report.py s3://corpora/v1 \\
        --out s3://corpora/v1-report/report.html

The report is rendered in the job's driver; it reads the corpus index, manifest and a
few gallery samples, with no Ray work. A job's working dir does not outlive the job,
so ``--out`` should name storage that does: an ``s3://`` key, or a shared volume.
"""

from __future__ import annotations

import sys

from reelpack.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
