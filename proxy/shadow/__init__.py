"""Shadow checks: audits of semantic cache hits against a fresh engine answer, and the
controllers that tune thresholds from what the audits measure.

- ``compare.py``: pure comparison of two answers (exact text, or cosine of their embeddings)
- ``stats.py``: Wilson score interval and a sliding window of audit outcomes
- ``tuner.py``: the pure controller for a tier's verifier cut-off and its stateful shell
- ``audit.py``: the background sender (sampling, bounded concurrency, cancellation)
- ``metrics.py``: the ``frugal_cache_audit_*`` and ``frugal_threshold_*`` series
"""
