"""The project's structure: layers without upward imports, no hidden import cycles, and every registered model.

Layers: compress (models, methods, checkpoints, training) <- calibration (calibration data, quantisation) <- export
(deploy, ONNX, validation, engines, benchmarks, the keep-ratio sweep); trt_plugins sits beside export and may use
only compress's torch-free plumbing. The target stage (export.on_target) reaches no torch or timm through any import,
at any depth. Imports of this project's own modules are module-level: a function-level one
is allowed only where a torch-free module (the target-side tools run on a Jetson without torch) reaches into a
torch one, and is listed here with that reason.
"""
from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest
import torch

from compress.models import DEFAULT_KEEP_RATIO, create_model, list_models, model_from_config, variant
from compress.models.registry import DynamicViTConfig
from export.methods import DynamicViTExport
from export.on_target.compare import FLOAT32_MAX_ABS_ERROR
from export.validate import validate_graph

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("compress", "calibration", "export", "trt_plugins")
LAYER = {"compress": 0, "calibration": 1, "export": 2, "trt_plugins": 2}
TORCH_FREE_PLUMBING = {"compress.plumbing.errors", "compress.plumbing.cli", "compress.plumbing.files",
                       "compress.plumbing.folder_transaction"}
# (importing module, imported module): a torch-free module that reaches a torch one only when that path is used.
LAZY_PROJECT_IMPORTS = {
    ("export/bench.py", "compress.models.checkpoint"),  # PyTorch eager timing of a checkpoint: torch needed then only
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


# --- compress/: plumbing <- models, data <- training <- the commands ------------------------------------------

# The groups of compress/ and what each may import of the others: the torch-free plumbing imports nothing of the
# project; models and data only the plumbing (never each other); training all three; the commands at compress/'s
# top level (train, masked_ft, describe, ...) anything in compress.
COMPRESS_GROUP_LEVEL = {"plumbing": 0, "models": 1, "data": 1, "training": 2}
COMMANDS_LEVEL = 3


def compress_group(module: str) -> tuple[str, int]:
    """(group, level) of a compress module: its subpackage, or the commands at compress/'s top level."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in COMPRESS_GROUP_LEVEL:
        return parts[1], COMPRESS_GROUP_LEVEL[parts[1]]
    return "commands", COMMANDS_LEVEL


@pytest.mark.parametrize("path", sorted((REPO / "compress").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_compress_groups_import_only_downward(path):
    module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    group, level = compress_group(module)
    for imported, _ in project_imports(path):
        if imported.split(".")[0] != "compress" or imported == "compress":
            assert group != "plumbing", f"{module} imports {imported}: the plumbing imports nothing of the project"
            continue
        other, other_level = compress_group(imported)
        assert other == group or other_level < level, f"{module} ({group}) imports {imported} ({other})"


def test_the_plumbing_needs_nothing_but_the_standard_library():
    plumbing = sorted(f"compress.plumbing.{path.stem}" for path in (REPO / "compress" / "plumbing").glob("*.py"))
    external = reachable_imports(plumbing)
    assert external == {}, external


# --- the target stage: torch-free over the whole import graph -------------------------------------------------

TARGET_PACKAGE = "export.on_target"
# What the target stage may import on a Jetson besides the standard library: these distributions, and project
# modules that (transitively) import nothing else. Function-level imports count: a Jetson user can reach them.
# onnxruntime_extensions runs the plugin flavour's TokenGather node on ONNX Runtime (optional, imported on use).
TARGET_THIRD_PARTY = {"numpy", "onnx", "onnxruntime", "onnxruntime_extensions", "polygraphy", "tensorrt",
                      "tensorrt_rtx_bindings"}


def module_path(module: str, root: Path = REPO) -> Path | None:
    """The file of a project module (a package's __init__.py for a package), or None when it is not the project's."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of ``path`` names, at any level (a function-level import counts too)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # `from pkg import module`
    return found


def reachable_imports(start: list[str], root: Path = REPO) -> dict[str, str]:
    """Third-party top-level name -> the project module importing it, over every project module reachable from
    ``start`` (importing ``a.b.c`` runs ``a/__init__.py`` and ``a/b/__init__.py`` too)."""
    seen, todo, external = set(), list(start), {}
    while todo:
        module = todo.pop()
        parts = module.split(".")
        for depth in range(1, len(parts) + 1):
            name = ".".join(parts[:depth])
            path = module_path(name, root)
            if path is None or name in seen:
                continue
            seen.add(name)
            for imported in imported_modules(path):
                if module_path(imported.split(".")[0], root) is not None:
                    todo.append(imported)
                elif imported.split(".")[0] not in sys.stdlib_module_names:
                    external.setdefault(imported.split(".")[0], name)
    return external


def target_modules(root: Path = REPO) -> list[str]:
    return sorted(".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                  for p in (root / "export" / "on_target").rglob("*.py"))


def test_the_target_stage_imports_no_torch_over_its_whole_import_graph():
    modules = target_modules()
    assert {"export.on_target.engine", "export.on_target.bench", "export.on_target.compare", "export.on_target.golden",
            "export.on_target.tensorrt_support", "export.on_target.tensorrt_engine"} <= set(modules)
    external = reachable_imports(modules)
    assert set(external) <= TARGET_THIRD_PARTY, {name: external[name] for name in set(external) - TARGET_THIRD_PARTY}
    assert {"numpy", "onnx", "onnxruntime", "tensorrt"} <= set(external)  # the walk does reach the runtimes


def test_the_import_walk_finds_a_torch_import_planted_deep_in_the_target_stage(tmp_path):
    """A function-level torch import in a module the target reaches only through another (golden via compare's
    sibling engine) is named, with the module that holds it."""
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    golden = tmp_path / "export" / "on_target" / "golden.py"
    golden.write_text(golden.read_text() + "\n\ndef planted():\n    import torch.nn\n")
    external = reachable_imports(["export.on_target.engine"], tmp_path)
    assert external.get("torch") == "export.on_target.golden"
    # A planted import through the plumbing the target uses is found as well.
    errors = tmp_path / "compress" / "plumbing" / "errors.py"
    errors.write_text(errors.read_text() + "\nfrom compress.models.checkpoint import load_dynamicvit  # noqa\n")
    assert "torch" in reachable_imports(["export.on_target.compare"], tmp_path)


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
