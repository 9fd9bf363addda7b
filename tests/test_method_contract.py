"""The method contract covers the whole pipeline: a method defined here, in the test tree, exports, validates and
is re-checked on the target through ``export_model`` and ``export.engine`` without a line of them knowing it."""
from __future__ import annotations

import io
import json
import tokenize
from pathlib import Path

import numpy as np
import onnx
import pytest

from compress.models.checkpoint import demo_checkpoint_path, load_dynamicvit
from compress.plumbing.cli import run_cli
from export.api import ExportError, ExportRequest, export_model
from export.on_target import engine as target_engine
from fixed_stride_method import FixedStrideExport, FixedStrideOptions

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("fixed_stride")
    request = ExportRequest(method=FixedStrideOptions(stride=3, after_block=2), backend="ort", out=root / "out")
    return export_model(request)


def test_a_method_from_the_test_tree_exports_and_validates_through_export_model(exported):
    manifest = exported.manifest
    assert manifest.method == {"method": "fixed-stride", "stride": 3, "after_block": 2, "patches": 64,
                               "kept_per_stage": [22]}
    assert manifest.gather == "gather" and manifest.keep_ratio is None and manifest.model["label"] == "demo"
    # Validated on random and on the demo model's real test images: logits within 1e-4, the same kept positions.
    comparisons = manifest.validation["onnx"]["comparisons"]
    assert {c["inputs"] for c in comparisons} == {"random", "demo-test"}
    for c in comparisons:
        assert c["passed"] and c["max_abs_error"] <= 1e-4 and c["kept_order_identical"], c
    assert exported.degree_text == "at stride 3 after block 2 (patch tokens 64 -> 22)"
    assert exported.decisions == "kept tokens"
    # The graph prunes: after block 2 the sequence is CLS + 22 patch tokens, and the debug twin says which.
    debug = onnx.load(exported.out / "model.debug.onnx")
    assert [o.name for o in debug.graph.output] == ["logits", "kept_patches"]
    golden = np.load(exported.out / "golden.npz")
    kept = [golden[name] for name in golden.files if name.endswith("/kept_stage1")]  # one decision output: stage 1
    assert len(kept) == 2 and all((row == np.arange(0, 64, 3)).all() for array in kept for row in array)
    # The method counts its own MACs: fewer than the same model unpruned (stride 1).
    model = load_dynamicvit(demo_checkpoint_path()).model
    assert manifest.macs == FixedStrideExport(3, 2).macs(model) < FixedStrideExport(1, 2).macs(model)
    assert json.loads((exported.out / "manifest.json").read_text())["method"]["method"] == "fixed-stride"


def test_the_target_stage_rechecks_the_new_methods_folder_against_its_golden_data(exported, capsys):
    assert run_cli(target_engine.main, [str(exported.out), "--backend", "ort"]) == 0, capsys.readouterr()


def test_the_new_methods_options_are_checked_before_any_work(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(ExportError, match="stride must be >= 1"):
        export_model(ExportRequest(method=FixedStrideOptions(stride=0), backend="ort", out=out))
    with pytest.raises(ExportError, match="float32 graphs only"):
        export_model(ExportRequest(method=FixedStrideOptions(), fp16=True, backend="ort", out=out))
    with pytest.raises(ExportError, match="after_block must be a block"):
        export_model(ExportRequest(method=FixedStrideOptions(after_block=6), backend="ort", out=out))
    plugin = tmp_path / "plugin.safetensors"
    plugin.write_bytes(b"not read")
    with pytest.raises(ExportError, match="no ToCom plugins"):
        export_model(ExportRequest(method=FixedStrideOptions(), tocom=plugin, backend="ort", out=out))
    assert not out.exists() and list(tmp_path.iterdir()) == [plugin]


def code_words(path: Path) -> str:
    """The source of ``path`` without its comments and string literals (docstrings included), lower case."""
    kept = [token.string for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
            if token.type not in (tokenize.COMMENT, tokenize.STRING)]
    return " ".join(kept).lower()


def test_the_pipeline_knows_no_method_by_name():
    code = code_words(REPO / "export" / "api.py")
    for word in ("tome", "dynamicvit", "stage_keep_counts", "merge_plugin", "r_train", "selection_flavours"):
        assert word not in code, f"export/api.py names {word!r}: a method's step belongs to the method"
