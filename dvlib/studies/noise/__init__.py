"""Training noise on a fixed split, and the IID/Dirichlet comparison measured against it
(:mod:`~dvlib.studies.noise.report`; ``make report-seeds``, ``tools/training_noise.py``)."""
