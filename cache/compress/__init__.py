"""Token-level compression of stored KV segments (LaProx and the standard eviction presses).

``kvjudge.cache.compress.registry.compress_segment(segment, model, method, ratio)`` is what the store
applies at put time (``none``, and every method at ratio 1, returns the segment itself); the method
names are listed torch-free in :mod:`kvjudge.cache.compress.catalog`. This package ``__init__`` imports
nothing, so the catalog never pulls in torch.
"""
