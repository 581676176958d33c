"""Compression method names, torch-free (for YAML / CLI validation); a test keeps it equal to the registry."""

COMPRESSION_METHODS: tuple[str, ...] = ("none", "laprox", "streaming", "snapkv", "knorm", "random")
