"""Prediction, one module per concern.

* ``config``: ``PredictConfig`` (the flags of ``dlseg/predict.py``), device defaults, ``Shard``;
* ``predictor``: the model wrapper (TTA, post-processing) with an in-memory API, no files;
* ``tta``: the test-time views a model was trained to be invariant to;
* ``ensemble``: several models as one predictor (mean of probabilities);
* ``inputs``: cohorts (CHAOS tree, DICOM tree, store) and the case loader;
* ``outputs``: the prediction folder format, written and read;
* ``records``: fingerprints, resume, summaries;
* ``runner``: ``predict_cohort`` over the processes of a launch.
"""
