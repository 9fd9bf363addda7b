"""calibration: calibration sets, INT8 with explicit Q/DQ, and choosing a keep ratio for a latency budget.

- ``calibration.data``: ``--calib-data`` (``demo``, an image folder, a .npy/.npz) -> a fixed seeded sample,
  preprocessed like the model's eval inputs, cached;
- ``calibration.int8``: ``quantize_for_export`` (ModelOpt or ONNX Runtime Q/DQ) and ``transplant_qdq``
  (the same Q/DQ on the debug twin and the TokenGather plugin flavour);
- ``calibration.evaluate``: accuracy and agreement of exported graphs on ONNX Runtime;
- ``python -m calibration.sweep``: accuracy and latency over keep ratios, Pareto front, budget pick.
"""
