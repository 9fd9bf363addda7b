"""The project's structure: layers without upward imports, no hidden import cycles, and every registered model.

Layers: compress (models, methods, checkpoints, training) <- calibration (calibration data, quantisation) <- export
(deploy, ONNX, validation, engines, benchmarks, the keep-ratio sweep); trt_plugins sits beside export and may use
only compress's torch-free plumbing. Imports of this project's own modules are module-level: a function-level one
is allowed only where a torch-free module (the target-side tools run on a Jetson without torch) reaches into a
torch one, and is listed here with that reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from compress.models import DEFAULT_KEEP_RATIO, create_model, list_models, model_from_config, variant
from compress.registry import DynamicViTConfig
from export.compare import FLOAT32_MAX_ABS_ERROR
from export.methods import DynamicViTExport
from export.validate import validate_graph

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "calibration", "export", "trt_plugins")
LAYER = {"compress": 0, "calibration": 1, "export": 2, "trt_plugins": 2}
TORCH_FREE_PLUMBING = {"compress.errors", "compress.cli", "compress.files"}
# (importing module, imported module): a torch-free module that reaches a torch one only when that path is used.
LAZY_PROJECT_IMPORTS = {
    ("export/bench.py", "compress.checkpoint"),  # PyTorch eager timing of a checkpoint: torch needed then only
}


def project_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported project module, imported at module level) for every import statement of ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(name, id(node) in top_level) for name in names if name.split(".")[0] in PACKAGES]
    return found


def project_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))


@pytest.mark.parametrize("path", project_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_upward_imports_and_no_hidden_project_imports(path):
    relative = str(path.relative_to(REPO))
    package = relative.split("/")[0]
    for module, top_level in project_imports(path):
        target = module.split(".")[0]
        if package == "trt_plugins":
            assert target == "trt_plugins" or module in TORCH_FREE_PLUMBING, f"{relative} imports {module}"
        else:
            assert LAYER[target] <= LAYER[package], f"{relative} imports {module}: an upward import"
        assert top_level or (relative, module) in LAZY_PROJECT_IMPORTS, (
            f"{relative} imports {module} inside a function: move it to the top (or break the cycle it hides)")


# --- every registered variant ----------------------------------------------------------------------------------

# Parameter counts of the reference implementation's DynamicViT models (backbone + 3 prediction modules).
REFERENCE_PARAMETERS = {"dynamicvit_deit_small": 22_774_414, "dynamicvit_deit_base": 89_452_846}


@pytest.fixture(scope="module", params=list_models())
def registered(request):
    torch.manual_seed(0)
    return request.param, create_model(request.param).eval()


def test_every_variant_builds_with_its_spec_and_standard_keys(registered):
    name, model = registered
    spec = variant(name)
    assert model.config.family == spec.family and model.config.keep_ratio == spec.default_keep
    assert tuple(model.config.pruning_locations) == spec.pruning_locations
    assert model.embed_dim == spec.arch["embed_dim"] and len(model.blocks) == spec.arch["depth"]
    keys = set(model.state_dict())
    for stage in range(len(spec.pruning_locations)):
        assert f"score_predictor.{stage}.in_conv.0.weight" in keys and f"score_predictor.{stage}.out_conv.4.bias" in keys
    assert {"cls_token", "pos_embed", "norm.weight", "head.weight"} <= keys
    if name in REFERENCE_PARAMETERS:
        assert sum(p.numel() for p in model.parameters()) == REFERENCE_PARAMETERS[name]


def test_every_variant_config_round_trips(registered):
    name, model = registered
    config = DynamicViTConfig.from_dict(model.config.to_dict())
    assert config == model.config
    rebuilt = model_from_config(config)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_every_variant_runs_pruned_with_the_keep_schedule(registered):
    name, model = registered
    images = torch.randn(1, *model.image_shape)
    with torch.no_grad():
        logits, kept = model.forward_pruned(images, return_indices=True)
    counts = model.stage_keep_counts()
    assert logits.shape == (1, model.num_classes) and torch.isfinite(logits).all()
    assert [k.shape[1] for k in kept] == counts == [int(model.num_patches * DEFAULT_KEEP_RATIO**s) for s in (1, 2, 3)]
    assert model.stage_keep_counts(1.0) == []  # the dense model has no pruning stage


@pytest.mark.parametrize("name, overrides", [("dynamicvit_deit_tiny", {"img_size": 64}), ("demo-vit", {})])
def test_tiny_export_agrees_with_onnx_runtime(name, overrides):
    torch.manual_seed(1)
    model = create_model(name, **overrides).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = DynamicViTExport(0.6)
    debug = method.export_onnx(method.deploy_copy(model, "fp32"), "native", 2, False, 17, True)
    images = {"random": torch.randn(4, *model.image_shape)}
    (result,) = validate_graph(debug, method.reference(model), images, FLOAT32_MAX_ABS_ERROR, batch_sizes=[2])
    assert result.passed and result.kept_sets_identical and result.max_abs_error <= FLOAT32_MAX_ABS_ERROR
    # The export never touches the caller's model: same weights, same keep ratio.
    assert model.keep_ratio == variant(name).default_keep
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.explicit_attention


def test_every_name_the_compress_package_offers_resolves():
    import compress

    for name in compress.__all__:
        assert getattr(compress, name) is not None, name
