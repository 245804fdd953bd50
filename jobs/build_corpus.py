"""Ray job entry point: build a corpus on a Ray cluster.

    ray job submit --working-dir . -- python jobs/build_corpus.py \
        s3://raw-videos/ --out s3://corpora/v1 --preset default

Inside a Ray job the driver joins the job's cluster (``RAY_ADDRESS`` is set by
``ray job submit``); S3 settings in the job's runtime env reach the workers.
Same flags as ``reelpack build``.
"""

from __future__ import annotations

import os
import sys

from reelpack.cli import main

if __name__ == "__main__":
    argv = ["build", *sys.argv[1:]]
    if os.environ.get("RAY_ADDRESS") and "--ray-address" not in argv:
        argv += ["--ray-address", "auto"]
    sys.exit(main(argv))
