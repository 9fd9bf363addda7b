"""calibration: calibration sets and INT8 with explicit Q/DQ.

- ``calibration.data``: ``--calib-data`` (``demo``, an image folder, a .npy/.npz) -> a fixed seeded sample,
  preprocessed like the model's eval inputs, cached; ``check_image_source`` refuses unusable sources early;
- ``calibration.int8``: ``quantize_for_export`` (ModelOpt or ONNX Runtime Q/DQ, calibrated on the float32 graph)
  and ``transplant_qdq`` (the same Q/DQ on the mixed float16 graph TensorRT runs, its debug twin and the
  TokenGather plugin flavour);
- ``calibration.onnx_graph``: facts read from an ONNX graph (``static_batch``, ``default_opset``,
  ``element_types``), needing onnx only.

Measuring exported graphs (``export.evaluate``) and choosing a keep ratio for a latency budget
(``python -m export.sweep``) belong to the export stage, which this package never imports.
"""
