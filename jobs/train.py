"""Ray job entry point: train a DiT on a corpus.

    ray job submit --working-dir . -- python jobs/train.py s3://corpora/v1 --out /ckpt/run1 --steps 1000

Same flags as ``reelpack train``.
"""

from __future__ import annotations

import sys

from reelpack.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
