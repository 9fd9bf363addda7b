"""TokenGather inside TensorRT: ONNX node -> parser -> plugin -> engine, against the reference.

Needs TensorRT's Python bindings, a CUDA device and the CUDA toolkit; the plugin is built once per session
for the device's architecture into a temporary directory.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from onnx import TensorProto

import trt_plugins
from compress.models.token_select import select_tokens
from trt_plugins.ort_token_gather import make_token_gather_model

try:
    import tensorrt as trt
except ImportError:
    trt = None

pytestmark = [
    pytest.mark.skipif(trt is None, reason="TensorRT not installed"),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"),
]

TORCH_TYPES = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16}


@pytest.fixture(scope="module")
def plugin_build_dir(tmp_path_factory):
    from trt_plugins import build as plugin_build

    major, minor = torch.cuda.get_device_capability()
    build_dir = tmp_path_factory.mktemp("token_gather_build")
    try:
        plugin_build.build(None, f"{major}{minor}", build_dir)
    except plugin_build.BuildError as error:
        pytest.skip(f"plugin could not be built here: {error}")
    return build_dir


@pytest.fixture(scope="module")
def plugin_loaded(plugin_build_dir):
    trt_plugins.load_plugin_library(plugin_build_dir)
    return plugin_build_dir


class OnnxParseFailed(Exception):
    """The ONNX parser rejected the model (the plugin was not found, or an attribute was refused)."""


class EngineBuildFailed(Exception):
    """The network parsed, and the builder produced no engine; ``errors`` holds what TensorRT logged."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors) or "engine build failed")
        self.errors = errors


class RecordingLogger(trt.ILogger if trt is not None else object):
    """Keeps every error TensorRT logs; the plugin logs through libnvinfer's logger, which is this one."""

    def __init__(self):
        super().__init__()
        self.errors: list[str] = []

    def log(self, severity, message):
        if int(severity) <= int(trt.ILogger.Severity.ERROR):  # INTERNAL_ERROR = 0, ERROR = 1
            self.errors.append(message)


def build_engine(model, num_tokens, channels, max_batch=8):
    logger = RecordingLogger()
    builder = trt.Builder(logger)
    # Strongly typed keeps float16 tensors float16 on TensorRT 10 (on 11 every network is strongly typed).
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if flag is None else 1 << int(flag))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(model.SerializeToString()):
        raise OnnxParseFailed("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    profile.set_shape("tokens", (1, num_tokens, channels), (2, num_tokens, channels), (max_batch, num_tokens, channels))
    profile.set_shape("scores", (1, num_tokens - 1), (2, num_tokens - 1), (max_batch, num_tokens - 1))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildFailed(logger.errors)
    # Deserialising in a fresh runtime checks that K and with_indices travel in the engine.
    return trt.Runtime(logger).deserialize_cuda_engine(serialized)


def run_engine(engine, feeds: dict, outputs: dict):
    context = engine.create_execution_context()
    for name, tensor in feeds.items():
        context.set_input_shape(name, tuple(tensor.shape))
        context.set_tensor_address(name, tensor.data_ptr())
    for name, tensor in outputs.items():
        context.set_tensor_address(name, tensor.data_ptr())
    stream = torch.cuda.current_stream()
    assert context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()


@pytest.mark.parametrize("tokens_type", [TensorProto.FLOAT, TensorProto.FLOAT16], ids=["tok32", "tok16"])
@pytest.mark.parametrize("scores_type", [TensorProto.FLOAT, TensorProto.FLOAT16], ids=["sc32", "sc16"])
@pytest.mark.parametrize("with_indices", [False, True], ids=["kept", "kept+indices"])
def test_engine_matches_reference(plugin_loaded, tokens_type, scores_type, with_indices):
    batch, num_tokens, channels, k = 3, 197, 384, 98
    model = make_token_gather_model(k, with_indices, tokens_type, scores_type, num_tokens, channels)
    engine = build_engine(model, num_tokens, channels)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(batch, num_tokens, channels, generator=generator).to(TORCH_TYPES[tokens_type])
    scores = (torch.round(torch.randn(batch, num_tokens - 1, generator=generator) * 2) / 2).to(
        TORCH_TYPES[scores_type])
    expected_kept, expected_indices = select_tokens(tokens, scores, k)
    outputs = {"kept": torch.full((batch, k + 1, channels), float("nan"), dtype=tokens.dtype, device="cuda")}
    if with_indices:
        outputs["indices"] = torch.full((batch, k), -7, dtype=torch.int32, device="cuda")
    run_engine(engine, {"tokens": tokens.cuda(), "scores": scores.cuda()}, outputs)
    assert torch.equal(outputs["kept"].cpu(), expected_kept)
    if with_indices:
        assert torch.equal(outputs["indices"].cpu().long(), expected_indices)


def test_engine_rejects_k_larger_than_patches(plugin_loaded):
    """K = 16 > N - 1 = 8: the node parses (K is only an attribute) and the plugin's configurePlugin refuses it."""
    model = make_token_gather_model(16, False, num_tokens=9, channels=4)
    with pytest.raises(EngineBuildFailed) as failure:
        build_engine(model, 9, 4)
    assert any("K = 16 must lie in [1, N - 1] with N = 9" in message for message in failure.value.errors), \
        failure.value.errors


def test_dynamic_library_registers_through_load_library(plugin_build_dir):
    """The getCreators build, loaded by IPluginRegistry.load_library in a fresh process (never beside the
    self-registering build, which would offer the same creator twice)."""
    library = trt_plugins.library_path("dynamic", plugin_build_dir)
    code = (
        "import tensorrt as trt, sys\n"
        "registry = trt.get_plugin_registry()\n"
        f"handle = registry.load_library({str(library)!r})\n"
        "assert handle is not None, 'load_library failed'\n"
        f"creator = registry.get_creator({trt_plugins.PLUGIN_NAME!r}, {trt_plugins.PLUGIN_VERSION!r}, "
        f"{trt_plugins.PLUGIN_NAMESPACE!r})\n"
        "assert creator is not None, 'creator not registered'\n"
        "names = sorted(f.name for f in creator.field_names)\n"
        f"assert names == sorted([{trt_plugins.ATTR_KEEP!r}, {trt_plugins.ATTR_WITH_INDICES!r}]), names\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
