"""Job entry point: train a DiT on a corpus (same flags as ``reelpack train``).

One process::

    python jobs/train.py /data/corpus --out /ckpt/run1 --steps 1000

Several GPUs with DDP (or FSDP for the large presets), one process per GPU::

    torchrun --nproc_per_node 8 jobs/train.py /data/corpus --out /ckpt/run1 --device cuda \\
        --preset DiT-XL --fsdp true --token-budget 32768 --steps 100000

On a Ray cluster (Ray Train ``TorchTrainer``, one worker per GPU; the job's
``RAY_ADDRESS`` is joined, ``--ray-address`` names another cluster)::

    ray job submit --working-dir . -- python jobs/train.py s3://corpora/v1 \\
        --out /shared/ckpt/run1 --ray-workers 8 --ray-gpu --steps 100000

Tiny CPU checks (2 processes, gloo; with ``--ray-workers`` on a fresh local Ray)::

    torchrun --nproc_per_node 2 jobs/train.py /tmp/demo/corpus --out /tmp/ddp --steps 4 --token-budget 512
    python jobs/train.py /tmp/demo/corpus --out /tmp/ray --steps 4 --token-budget 512 --ray-workers 2
"""

from __future__ import annotations

import sys

from reelpack.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
