"""One stage per module. None of them imports Ray; see ``pipeline.graph``."""
