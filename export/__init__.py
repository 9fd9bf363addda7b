"""export: the export stage (deploy copy, ONNX, validation, golden data), the target-side engine stage, benchmarks."""
