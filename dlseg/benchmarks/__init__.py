"""The stages of ``python -m dlseg.bench``: each measures a hot path and its baselines in the same run.

``common`` holds the configuration, the cached synthetic cohort, timing, peak-memory and machine helpers; one
module per stage (``loader``, ``augment``, ``preprocess``, ``predict``, ``train``) exposes ``run(cfg, cohort)``
returning a :class:`~dlseg.benchmarks.common.StageResult`.
"""
