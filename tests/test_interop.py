"""A corpus is plain data: shards read by bare webdataset, the index by pandas, DuckDB and
Hugging Face ``datasets``, in a process that never imports reelpack; nothing is pickled."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

import schemas
from pipeline.stages.base import rows_to_batch
from pipeline.writer import CorpusWriter, WriteConfig


def _blob(seed: int, t: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        schemas.TENSOR_LATENTS: torch.randn(4, t, 4, 6, generator=g).to(torch.bfloat16),
        schemas.latents_tensor_name(16, 32): torch.randn(4, t, 2, 4, generator=g).to(
            torch.bfloat16
        ),
        # what the text-encode stage adds after encode: the blob is a plain dict
        schemas.TENSOR_TEXT_EMBEDS: torch.randn(5, 8, generator=g).to(torch.bfloat16),
    }
    return st_save(tensors)


def _rows() -> list[dict]:
    rows = []
    for i in range(5):
        status = "rejected" if i == 2 else "kept"
        rows.append(
            {
                "source": f"/videos/v{i}.mp4",
                "src_status": "done",
                "src_num_clips": 1,
                "clip_id": f"clip{i:02d}",
                "status": status,
                "reasons": ["too_dark"] if status == "rejected" else [],
                "caption": f"a caption, number {i}" if status == "kept" else None,
                "latent_shape": [4, 1 + i, 4, 6] if status == "kept" else None,
                "num_tokens": (1 + i) * 6 if status == "kept" else None,
                "extra_latents": [schemas.latents_tensor_name(16, 32)]
                if status == "kept"
                else None,
                "extra_latent_shapes": [[4, 1 + i, 2, 4]] if status == "kept" else None,
                "latents": _blob(i, 1 + i) if status == "kept" else None,
                **{schemas.score_column(n): 0.25 for n in schemas.SCORE_NAMES},
            }
        )
    return rows


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("interop") / "corpus")
    writer = CorpusWriter(root, WriteConfig(shard_max_samples=2))
    writer.add(rows_to_batch(_rows(), columns=schemas.STREAM_COLUMNS))
    writer.close()
    writer.write_manifest({"vae": {"id": "tiny", "latent_channels": 4}, "patch_size": [1, 2, 2]})
    return root


_READER = textwrap.dedent(
    """
    import glob, json, sys
    root, cache = sys.argv[1], sys.argv[2]
    import duckdb, pandas, webdataset, datasets
    from safetensors.torch import load  # bf16: numpy has no bfloat16

    out = {}
    df = pandas.read_parquet(root + "/index")
    out["pandas_rows"] = len(df)
    out["pandas_kept"] = int((df["status"] == "kept").sum())
    rel = duckdb.sql(
        f"select clip_id, latent_shape, extra_latent_shapes from read_parquet('{root}/index/*.parquet') "
        "where status = 'kept' order by clip_id"
    )
    out["duckdb"] = [[r[0], list(r[1]), [list(s) for s in r[2]]] for r in rel.fetchall()]
    ds = datasets.load_dataset(
        "parquet", data_files=sorted(glob.glob(root + "/index/*.parquet")), split="train",
        cache_dir=cache,
    )
    out["datasets_rows"] = ds.num_rows
    out["datasets_captions"] = sorted(c for c in ds["caption"] if c)
    samples = []
    urls = sorted(glob.glob(root + "/shards/*.tar"))
    for s in webdataset.WebDataset(urls, shardshuffle=False):
        tensors = load(s["latents.safetensors"])
        samples.append({
            "key": s["__key__"],
            "members": sorted(k for k in s if not k.startswith("__")),
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
            "meta_clip_id": json.loads(s["json"])["clip_id"],
            "caption": s["txt"].decode(),
        })
    out["samples"] = samples
    out["leaked"] = [m for m in ("pipeline", "schemas", "reelpack", "model") if m in sys.modules]
    print(json.dumps(out))
    """
)


def test_index_and_shards_read_without_reelpack(corpus: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_DATASETS_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", _READER, corpus, str(tmp_path / "hf-cache")],
        cwd=tmp_path,  # not the repo: nothing of reelpack is importable by accident
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["leaked"] == []
    kept = [r for r in _rows() if r["status"] == "kept"]
    assert out["pandas_rows"] == out["datasets_rows"] == 5 and out["pandas_kept"] == 4
    assert out["duckdb"] == [
        [r["clip_id"], r["latent_shape"], r["extra_latent_shapes"]] for r in kept
    ]
    assert out["datasets_captions"] == sorted(r["caption"] for r in kept)
    by_key = {s["key"]: s for s in out["samples"]}
    assert sorted(by_key) == [r["clip_id"] for r in kept]
    for r in kept:
        s = by_key[r["clip_id"]]
        assert s["members"] == sorted(
            [schemas.SAMPLE_LATENTS, schemas.SAMPLE_META, schemas.SAMPLE_CAPTION]
        )
        assert s["shapes"][schemas.TENSOR_LATENTS] == r["latent_shape"]
        assert s["shapes"][r["extra_latents"][0]] == r["extra_latent_shapes"][0]
        assert s["shapes"][schemas.TENSOR_TEXT_EMBEDS] == [5, 8]
        assert s["meta_clip_id"] == r["clip_id"] and s["caption"] == r["caption"]


def test_shards_hold_no_code_and_safe_names(corpus: str) -> None:
    shards = sorted(Path(corpus, schemas.SHARDS_DIR).glob("*.tar"))
    assert shards
    allowed = (schemas.SAMPLE_LATENTS, schemas.SAMPLE_META, schemas.SAMPLE_CAPTION)
    for path in shards:
        with tarfile.open(path) as tar:
            for info in tar.getmembers():
                assert info.isfile() and info.mode == 0o444 and info.mtime == 0
                assert not info.name.startswith("/") and ".." not in info.name
                assert "/" not in info.name
                suffix = info.name.partition(".")[2]
                assert suffix in allowed, info.name  # no .pyd / .pickle / .pth members


def test_model_data_refuses_a_pickle_member(corpus: str, tmp_path: Path) -> None:
    """The trainer's reader (model.data) decodes by suffix and refuses anything else."""
    from model.data import iter_samples

    bad = tmp_path / "bad"
    (bad / schemas.SHARDS_DIR).mkdir(parents=True)
    for name in (schemas.MANIFEST_NAME,):
        (bad / name).write_bytes(Path(corpus, name).read_bytes())
    src = sorted(Path(corpus, schemas.SHARDS_DIR).glob("*.tar"))[0]
    with tarfile.open(src) as tin, tarfile.open(bad / schemas.SHARDS_DIR / src.name, "w") as tout:
        for info in tin.getmembers():
            data = tin.extractfile(info)
            assert data is not None
            tout.addfile(info, data)
            if info.name.endswith(".txt"):
                evil = tarfile.TarInfo(info.name.replace(".txt", ".pyd"))
                payload = np.zeros(3).tobytes()
                evil.size = len(payload)
                tout.addfile(evil, io.BytesIO(payload))
    with pytest.raises(Exception, match=r"pyd|refus|unexpected|member"):
        list(iter_samples(str(bad)))
