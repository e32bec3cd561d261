"""Sample-quality evaluation (see docs/evaluation.md).

* :mod:`difflab.eval.features`: the FID InceptionV3 (pytorch-fid layout, local weights only) and
  difflab's MNIST classifier (shipped weights).
* :mod:`difflab.eval.metrics`: Frechet distance, improved precision / recall, Inception Score,
  conditional accuracy, reference statistics ``.npz``.
* :mod:`difflab.eval.report`: :func:`~difflab.eval.report.evaluate` and ``difflab eval``.
"""
