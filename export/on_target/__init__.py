"""export.on_target: the target-side stage, run on a Jetson (or any GPU machine) from a copied export folder.

It imports only the standard library, numpy, onnx, onnxruntime (and onnxruntime-extensions for the plugin
flavour), polygraphy and TensorRT, plus the project's torch-free plumbing (``compress.plumbing.errors``, ``compress.plumbing.cli``,
``compress.plumbing.files``), the plugin's loader and ONNX Runtime flavour (``trt_plugins``) and ``calibration.onnx_graph``;
``tests/test_architecture.py`` checks this over the whole import graph. Commands: ``python -m export.engine`` and ``python -m export.bench``.

- ``engine``: check, build, validate and time engines from an export folder;
- ``runtimes``: TensorRT and TensorRT-RTX as data, and the only import of either's bindings;
- ``tensorrt_engine``: every call into either runtime: parse, build, run, probe; trtexec lines;
- ``tensorrt_support``: will a graph parse on TensorRT 10.3 / 11.x (facts in ``tensorrt_support.json``);
- ``compare``: the one comparison of outputs (figures, criteria, batching) every backend shares;
- ``golden``: golden data on disk; ``environment``: the machine's facts; ``bench``: latency and its gate.
"""
