"""Studies beside the paper's method: each asks a question the paper does not, with its own steps,
report and figures, and each calls the core's stages (what a hospital runs) rather than its own copy.

- :mod:`dvlib.studies.federated`: Flower's FedAvg and FedBN against the data vector (notebook 07);
- :mod:`dvlib.studies.privacy`: membership inference on the shared vectors, DP-SGD hospitals (08);
- :mod:`dvlib.studies.noise`: training noise on a fixed split, IID against Dirichlet hospitals.

The core (everything in :mod:`dvlib` outside this package) never imports a study;
``tests/test_layout.py`` enforces it. The command line may, lazily, for ``dvlib run --with``.
"""
