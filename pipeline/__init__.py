"""Corpus building: probe, split, score, decide, caption, encode, write.

Each stage in ``pipeline.stages`` is Ray-free (a config dataclass, pure functions
and one callable class); ``pipeline.graph`` composes them on Ray Data.
"""
