/*
 * The names TensorRT and the ONNX parser use to find the TokenGather plugin. They must equal the Python
 * constants in trt_plugins/__init__.py (tests/test_trt_plugins_build.py checks that they do): the export
 * stage writes them into the ONNX node, the parser looks the creator up by them.
 */
#pragma once

namespace token_gather
{

constexpr char const* kPLUGIN_NAME = "TokenGather";      // ONNX op_type
constexpr char const* kPLUGIN_VERSION = "1";             // ONNX attribute plugin_version
constexpr char const* kPLUGIN_NAMESPACE = "";            // ONNX attribute plugin_namespace
constexpr char const* kFIELD_KEEP = "K";                 // int32, number of patch tokens kept, >= 1
constexpr char const* kFIELD_WITH_INDICES = "with_indices"; // int32 0/1, adds output 1 (kept indices)

} // namespace token_gather
