"""The one definition of every record and file layout in a reelpack corpus.

Column names and file keys here are permanent API: later versions add columns,
never rename or repurpose them. Bump ``SCHEMA_VERSION`` when the layout changes.

Tables (parquet, one file per committed part):

- ``sources/``: one row per input source, whatever happened to it.
- ``index/``: one row per clip, kept, rejected or failed, with every score.

Shards (webdataset tar) hold one sample per *kept* clip; see ``SAMPLE_*``.
The stream that flows between pipeline stages is wider than the index: it also
carries transient payload columns (``STREAM_ONLY_COLUMNS``) that are never
persisted in a table.
"""

from __future__ import annotations

import re

import pyarrow as pa

__all__ = [
    "CLIPS_DIR",
    "CLIP_COLUMNS",
    "CLIP_SCHEMA",
    "CLIP_STATUSES",
    "CONFIGS_DIR",
    "INDEX_DIR",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "SAMPLE_CAPTION",
    "SAMPLE_LATENTS",
    "SAMPLE_META",
    "SCHEMA_VERSION",
    "SCORE_NAMES",
    "SHARDS_DIR",
    "SOURCES_DIR",
    "SOURCE_SCHEMA",
    "SOURCE_STATUSES",
    "STREAM_COLUMNS",
    "STREAM_ONLY_COLUMNS",
    "STREAM_TYPES",
    "TENSOR_LATENTS",
    "TENSOR_LATENTS_AT",
    "TENSOR_TEXT_EMBEDS",
    "clip_file",
    "config_file",
    "latents_tensor_name",
    "score_column",
    "storage_location",
]

SCHEMA_VERSION = 1

# --- file layout under a corpus root -------------------------------------------------
MANIFEST_NAME = "manifest.json"
INDEX_DIR = "index"
SOURCES_DIR = "sources"
SHARDS_DIR = "shards"
# present while a build or refilter writes (pipeline.lock): who, and its last heartbeat
LOCK_NAME = "lock.json"
# optional (``write.clip_files``): each kept clip's payload, the H.264 mp4 at the working
# resolution and the VAE's frame rate that the stages saw, as ``clips/<key>.mp4``
CLIPS_DIR = "clips"


def clip_file(key: str) -> str:
    """Path of a kept clip's file under the corpus root."""
    return f"{CLIPS_DIR}/{key}.mp4"


# each build run's resolved config, named by its hash (sources.config_hash)
CONFIGS_DIR = "configs"


def config_file(config_hash: str) -> str:
    """Path of a build config under the corpus root."""
    return f"{CONFIGS_DIR}/{config_hash}.json"


# --- shard sample layout ---------------------------------------------------------------
# A sample ``<key>`` in a shard tar consists of these members (webdataset convention:
# ``<key>.<suffix>``). Nothing in a shard is pickled.
SAMPLE_LATENTS = "latents.safetensors"  # safetensors file, see TENSOR_* below
SAMPLE_META = "json"  # UTF-8 JSON object: the clip's index row (scalars only)
SAMPLE_CAPTION = "txt"  # UTF-8 caption
TENSOR_LATENTS = "latents"  # [C, T, H, W] bfloat16, normalised as the manifest says
TENSOR_TEXT_EMBEDS = "text_embeds"  # optional [L, D] caption embeddings, unpadded
# Optional extra resolutions of the same clip (same frames, other pixel budgets), e.g.
# ``latents@480x832``: [C, T, H', W'] bf16, normalised like TENSOR_LATENTS; H x W is the
# pixel size fed to the VAE. The index lists them in ``extra_latents`` /
# ``extra_latent_shapes``; TENSOR_LATENTS stays the primary (``pixel_budget``) latent.
TENSOR_LATENTS_AT = "latents@{height}x{width}"


def latents_tensor_name(height: int, width: int) -> str:
    """Safetensors name of the latent encoded at ``height`` x ``width`` pixels."""
    return TENSOR_LATENTS_AT.format(height=height, width=width)


SOURCE_STATUSES = ("done", "error")
CLIP_STATUSES = ("kept", "rejected", "error")

# Quality signals. Each gets a float64 column ``score_<name>`` in the index, written for
# every clip whether kept or not (NaN where a signal could not be computed).
SCORE_NAMES = (
    "sharpness",  # variance of the Laplacian of luma, on the working resolution
    "exposure",  # mean luma in [0, 1]
    "dark_fraction",  # share of near-black pixels (luma < 16/255)
    "bright_fraction",  # share of near-white pixels (luma > 239/255)
    "motion",  # mean absolute frame difference in [0, 1] between sampled frames
    "aesthetic",  # LAION improved-aesthetic predictor on CLIP image embeddings, ~1..10
    # --- added by the quality-scoring issue ---
    # dense optical flow (OpenCV DIS) between consecutive frames at a small analysis width:
    # mean flow magnitude in frame diagonals per second (0 = still)
    "flow",
    "still_fraction",  # share of sampled frame pairs without motion: 1 = static / slideshow
    "black_frame_fraction",  # share of sampled frames that are black (>= 98% dark pixels)
    "blank_frame_fraction",  # share of sampled frames of (nearly) uniform luma, any colour
    "text_coverage",  # share of the frame area covered by overlaid text (edge-based proxy)
    "agreement",  # CLIP cosine similarity of the clip and its caption, -1..1 (NaN: no caption)
)


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class UnsupportedLocation(ValueError):
    """A URI of a scheme reelpack does not read or write (``gs://``, ``https://``)."""


def storage_location(uri: str) -> str:
    """``uri`` as reelpack's storage layers take it: an ``s3://`` URI or a local path as it
    is, a ``file://`` URI as its path. :class:`UnsupportedLocation` for another scheme,
    which would otherwise be taken for a local folder (``gs://b/x`` as ``./gs:/b/x``)."""
    match = _SCHEME.match(uri)
    if match is None:
        return _not_a_mistyped_uri(uri)
    scheme = match.group(1)
    if scheme == "s3":
        return uri
    if scheme == "file":
        return uri[len("file://") :]
    if scheme.lower() in ("s3", "s3a", "s3n"):  # S3://, or Hadoop's names for S3
        raise UnsupportedLocation(f"{uri}: write it as s3://{uri[match.end() :]}")
    raise UnsupportedLocation(
        f"{uri}: {scheme}:// is not storage reelpack reads or writes; local paths, file:// "
        "and s3:// URIs are (another object store through its S3-compatible endpoint: "
        "s3:// URIs with AWS_ENDPOINT_URL set to it)"
    )


# storage schemes whose URIs, written with a slash too few, would be local paths
_MISTYPED = re.compile(
    r"^(s3|s3a|s3n|gs|gcs|file|https?|hdfs|az|abfss?|wasbs?|oss|r2):(?!//)/?", re.IGNORECASE
)


def _not_a_mistyped_uri(path: str) -> str:
    """``path``, a local path, unless it is a storage URI with a slash or two missing
    (``s3:/bucket/key`` would make the local folder ``./s3:``): the file URI of RFC 8089's
    one-slash form (``file:/data/v.mp4``) as its path, else :class:`UnsupportedLocation`."""
    match = _MISTYPED.match(path)
    if match is None:
        return path
    scheme, rest = match.group(1).lower(), path[match.end() :].lstrip("/")
    one_slash = path[match.end() - 1 : match.end()] == "/"
    if scheme == "file" and one_slash:
        return "/" + rest
    local = f"(a local path: ./{path})"
    if scheme.startswith("s3"):
        raise UnsupportedLocation(f"{path}: a slash is missing; write it as s3://{rest} {local}")
    if scheme == "file":
        raise UnsupportedLocation(f"{path}: not a file URI; write it as file:///{rest} {local}")
    raise UnsupportedLocation(
        f"{path}: a malformed {scheme}:// URI {local}; {scheme}:// is not storage reelpack "
        "reads or writes either: local paths, file:// and s3:// URIs are"
    )


def score_column(name: str) -> str:
    """Index column of one quality signal."""
    return f"score_{name}"


SOURCE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # URI: absolute path or s3://
        pa.field("status", pa.string(), nullable=False),  # SOURCE_STATUSES
        pa.field("error", pa.string()),  # reason, when status == "error"
        pa.field("duration_s", pa.float64()),
        pa.field("fps", pa.float64()),  # average frame rate
        pa.field("width", pa.int32()),  # display width (after SAR and rotation)
        pa.field("height", pa.int32()),  # display height
        pa.field("num_clips", pa.int32()),
        pa.field("num_frames", pa.int64()),
        pa.field("codec", pa.string()),
        # probe facts (added after v1 columns; null where a source failed before probing)
        pa.field("container", pa.string()),  # demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
        pa.field("media_kind", pa.string()),  # "video" or "image" (a still: one 1-frame clip)
        pa.field("coded_width", pa.int32()),  # decoded frame size before SAR and rotation
        pa.field("coded_height", pa.int32()),
        pa.field("sar", pa.float64()),  # sample (pixel) aspect ratio
        pa.field("rotation_deg", pa.int32()),  # display matrix, counter-clockwise: 0/90/180/270
        # the display matrix also mirrors the picture left-right, before the rotation (a
        # flipped selfie video, EXIF orientations 2, 4, 5, 7); null: not known
        pa.field("mirrored", pa.bool_()),
        pa.field("vfr", pa.bool_()),  # variable frame rate (packet durations differ)
        pa.field("start_s", pa.float64()),  # stream start time in the container
        pa.field("num_frames_exact", pa.bool_()),  # num_frames from the container, not estimated
        pa.field("has_audio", pa.bool_()),
        # the decoder flags the first frame interlaced: split deinterlaces (bwdif)
        pa.field("interlaced", pa.bool_()),
        # interlaced video carrying progressive pictures (3:2 telecine, 2:2 pulldown,
        # PsF): split puts each picture's fields back together (fieldmatch) first
        pa.field("pulldown", pa.bool_()),
        # FFmpeg's name of the first frame's transfer: "smpte2084" (PQ) and
        # "arib-std-b67" (HLG) are HDR, tone-mapped to SDR by split
        pa.field("color_transfer", pa.string()),
        # FFmpeg's name of the first frame's colour primaries: "bt2020" with an SDR
        # transfer has its colours brought to BT.709 by split
        pa.field("color_primaries", pa.string()),
        # share of the frame's area inside black bars, from frames probe samples (1.0:
        # none seen); split enlarges its working images by it
        pa.field("picture_fraction", pa.float64()),
        # the resolved build config the source was built with: config_file(config_hash)
        pa.field("config_hash", pa.string()),
    ]
)

CLIP_SCHEMA = pa.schema(
    [
        pa.field("clip_id", pa.string(), nullable=False),  # uuid5(source, start, end)
        pa.field("source", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # CLIP_STATUSES
        pa.field("reasons", pa.list_(pa.string())),  # every failed threshold
        pa.field("error", pa.string()),
        pa.field("start_s", pa.float64()),
        pa.field("end_s", pa.float64()),  # exclusive
        pa.field("start_frame", pa.int64()),  # source frame numbering
        pa.field("end_frame", pa.int64()),  # exclusive
        pa.field("fps", pa.float64()),
        # display size of the clip's picture: the source's (sources table), or where the
        # stream changed to a picture of another aspect ratio mid-file, that picture's
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        # (x, y, w, h) of the clip's display frame (width x height) kept after cropping
        # black bars off the clip (split.crop_borders); null: the whole frame
        pa.field("crop", pa.list_(pa.int32())),
        pa.field("caption", pa.string()),
        pa.field("latent_shape", pa.list_(pa.int32())),  # C, T, H, W
        pa.field("shard", pa.string()),  # shard path relative to the corpus root
        pa.field("key", pa.string()),  # sample key inside the shard
        # what the encoder saw: exact size, frame rate and frame count after resampling
        pa.field("encode_width", pa.int32()),
        pa.field("encode_height", pa.int32()),
        pa.field("encode_fps", pa.float64()),
        pa.field("encode_frames", pa.int32()),
        pa.field("num_tokens", pa.int64()),  # latent tokens at the manifest's patch size
        *[pa.field(score_column(n), pa.float64()) for n in SCORE_NAMES],
        # --- added by the encode/store issue (exact preprocessing, extra resolutions) ---
        # The clip payload's decoded size, then the primary latent's resize (aspect kept,
        # covering encode_width x encode_height) and the centre crop taken from it.
        pa.field("encode_src_width", pa.int32()),
        pa.field("encode_src_height", pa.int32()),
        pa.field("encode_resize_width", pa.int32()),
        pa.field("encode_resize_height", pa.int32()),
        pa.field("encode_crop_left", pa.int32()),
        pa.field("encode_crop_top", pa.int32()),
        # payload frame numbers (0-based) fed to the VAE, after fps resampling + frame rule;
        # payload frame j is clip frame pipeline.video.resample_indices(end_frame -
        # start_frame, fps, split.work_fps)[j] (split.work_fps: the manifest's config)
        pa.field("encode_frame_indices", pa.list_(pa.int32())),
        # Extra resolutions in the same safetensors blob (see TENSOR_LATENTS_AT): tensor
        # names, their [C, T, H, W] and tokens at the manifest's patch size, in the order
        # of the config's extra pixel budgets. Null when a clip has none.
        pa.field("extra_latents", pa.list_(pa.string())),
        pa.field("extra_latent_shapes", pa.list_(pa.list_(pa.int32()))),
        pa.field("extra_num_tokens", pa.list_(pa.int64())),
        # --- added by the quality-scoring issue (near-duplicates) ---
        # 64-bit perceptual hash (dHash, 16 hex digits) of the mean of the clip's sampled
        # frames; the L2-normalised CLIP image embedding of the clip (mean of its sampled
        # frames' embeddings, renormalised; null when no CLIP ran); the clip_id of the kept
        # clip this one duplicates (null: not a duplicate)
        pa.field("frame_hash", pa.string()),
        pa.field("clip_embedding", pa.list_(pa.float32())),
        pa.field("dup_of", pa.string()),
        # --- added by the captioning issue ---
        pa.field("caption_short", pa.string()),  # optional one-sentence caption (null: off)
        # rows L of the sample's text_embeds tensor (unpadded; null: no text encoder ran)
        pa.field("text_tokens", pa.int32()),
        # --- integrity ---
        # CRC-32 (zlib.crc32) of the sample's SAMPLE_LATENTS member bytes, also in its
        # SAMPLE_META JSON: readers check it (null: a sample written before the column)
        pa.field("latents_crc32", pa.int64()),
    ]
)

CLIP_COLUMNS = tuple(CLIP_SCHEMA.names)

# Transient columns that flow between stages and are never written to a table.
STREAM_ONLY_COLUMNS = (
    "clip_bytes",  # the clip at working resolution, H.264 mp4 bytes (decode once)
    "latents",  # safetensors bytes of the sample, produced by encode
    "src_status",  # source-level status / error / facts, folded into SOURCE_SCHEMA
    "src_error",
    "src_duration_s",
    "src_num_clips",  # None on rows of a streamed source's chunks but the last
    "src_num_frames",
    "src_codec",
    # probe facts, folded into the SOURCE_SCHEMA column of the same name without "src_"
    "src_width",  # the source's display size (a clip's width/height: its picture's)
    "src_height",
    "src_container",
    "src_media_kind",
    "src_coded_width",
    "src_coded_height",
    "src_sar",
    "src_rotation_deg",
    "src_mirrored",
    "src_vfr",
    "src_start_s",
    "src_num_frames_exact",
    "src_has_audio",
    "src_interlaced",
    "src_pulldown",
    "src_color_transfer",
    "src_color_primaries",
    "src_picture_fraction",
    # straggler ranges: one long source split into frame ranges processed in parallel,
    # stitched back on the driver (see pipeline.stitching)
    "range_start_frame",
    "range_end_frame",  # exclusive; None = to the end of the stream
    "range_index",
    "range_count",
    # every frame's pts of a ranged source as little-endian int64 bytes, demuxed once for
    # all its ranges (None on other rows)
    "range_frame_pts",
)

STREAM_COLUMNS = CLIP_COLUMNS + STREAM_ONLY_COLUMNS

# The Arrow type of every stream column that has one in the tables (clip columns, and
# source columns as ``src_<name>``). Between stages a frame library may hand a column
# with missing values over as float NaN; :func:`pipeline.stages.base.clean_batch` uses
# these types to turn them back into None, so blocks of different sources share one
# type per column.
STREAM_TYPES: dict[str, pa.DataType] = {
    **{f"src_{f.name}": f.type for f in SOURCE_SCHEMA},
    **{f.name: f.type for f in CLIP_SCHEMA},
    **{name: pa.int64() for name in STREAM_ONLY_COLUMNS if name.startswith("range_")},
    "range_frame_pts": pa.binary(),
    "clip_bytes": pa.binary(),
    "latents": pa.binary(),
}

# --- manifest.json ---------------------------------------------------------------------
# Top-level keys of ``<root>/manifest.json`` (a JSON object). Values:
#   schema_version   int, SCHEMA_VERSION
#   reelpack_version str, the package version that wrote the corpus
#   created_at       str, ISO-8601 UTC time of the last write
#   vae              object: id, class, subfolder, config_sha256, spatial_factor, temporal_factor,
#                    latent_channels, frame_rule {base, step}, normalization {kind, ...},
#                    weights_sha256 (model.fingerprint; null when the building machine
#                    did not have the files)
#   patch_size       [pt, ph, pw] used for ``num_tokens``
#   text_encoder     null or object: id, class, dim, max_length, subfolder,
#                    tokenizer_subfolder, random_weights, weights_sha256
#   captioner        null or object: id
#   random_weights   true when any model in the build had random weights (tiny preset):
#                    latents and captions are then meaningless test data
#   counts           object: sources, sources_error, clips, clips_kept, clips_rejected,
#                    clips_error, shards, latent_tokens
#   config           the resolved build config (JSON)
MANIFEST_KEYS = (
    "schema_version",
    "reelpack_version",
    "created_at",
    "vae",
    "patch_size",
    "text_encoder",
    "captioner",
    "random_weights",
    "counts",
    "config",
)
COUNT_KEYS = (
    "sources",
    "sources_error",
    "clips",
    "clips_kept",
    "clips_rejected",
    "clips_error",
    "shards",
    "latent_tokens",
)
__all__ += ["COUNT_KEYS", "MANIFEST_KEYS"]
