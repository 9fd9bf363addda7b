"""export.on_target.golden and export.on_target.compare: golden data on disk, and the one comparison every backend shares (numpy only)."""
from __future__ import annotations

import numpy as np
import pytest

from export.on_target.compare import RANDOM_INPUTS, compare, kept_overlap, run_batched, top1_agreement
from export.on_target.golden import (GOLDEN_FILE, GoldenDataError, debug_file_name, debug_role, golden_sets, load_golden,
                                     verified_path, write_golden)


def golden_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = {RANDOM_INPUTS: rng.standard_normal((3, 3, 8, 8)).astype(np.float32),
              "digits": rng.standard_normal((5, 3, 8, 8)).astype(np.float32)}
    references = {name: (rng.standard_normal((len(x), 10)).astype(np.float32),
                         [np.argsort(rng.random((len(x), 16)))[:, :k] for k in (9, 5)]) for name, x in images.items()}
    return images, references


def test_golden_data_round_trips_and_is_byte_identical(tmp_path):
    images, references = golden_inputs()
    entry = write_golden(tmp_path, images, references)
    assert entry["role"] == "golden" and entry["path"] == GOLDEN_FILE
    assert entry["sets"] == {RANDOM_INPUTS: {"images": 3, "judged": False}, "digits": {"images": 5, "judged": True}}
    loaded = load_golden(tmp_path, {"artifacts": [entry]})
    for name, data in loaded.items():
        np.testing.assert_array_equal(data.images, images[name])
        np.testing.assert_array_equal(data.logits, references[name][0])
        assert [k.dtype for k in data.kept] == [np.int64, np.int64]
        for got, expected in zip(data.kept, references[name][1]):
            np.testing.assert_array_equal(got, expected)
    again = tmp_path / "again"
    assert write_golden(again, images, references)["sha256"] == entry["sha256"]  # re-exports stay byte-identical
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_a_changed_truncated_or_missing_golden_file_is_refused(tmp_path):
    images, references = golden_inputs()
    entry = write_golden(tmp_path, images, references)
    manifest = {"artifacts": [entry]}
    path = tmp_path / GOLDEN_FILE
    original = path.read_bytes()
    path.write_bytes(original[:-10])
    with pytest.raises(GoldenDataError, match="sha256 mismatch"):
        load_golden(tmp_path, manifest)
    path.write_bytes(b"garbage")
    with pytest.raises(GoldenDataError, match="cannot read golden data"):
        load_golden(tmp_path, {"artifacts": [{**entry, "sha256": None}]})  # no hash recorded: the reader still refuses
    path.unlink()
    with pytest.raises(GoldenDataError, match="listed in the manifest but missing"):
        verified_path(tmp_path, entry)
    with pytest.raises(GoldenDataError, match="lists no golden data"):
        load_golden(tmp_path, {"artifacts": []})


def test_golden_inputs_are_checked_before_writing(tmp_path):
    images, references = golden_inputs()
    with pytest.raises(GoldenDataError, match="use letters"):
        write_golden(tmp_path, {"a/b": images["digits"]}, {"a/b": references["digits"]})
    with pytest.raises(GoldenDataError, match="outputs for a different count"):
        write_golden(tmp_path, {"digits": images["digits"][:4]}, {"digits": references["digits"]})
    with pytest.raises(GoldenDataError, match="differ"):
        write_golden(tmp_path, images, {"digits": references["digits"]})
    assert not (tmp_path / GOLDEN_FILE).exists()
    with pytest.raises(GoldenDataError, match="lacks images, logits or a kept_stage"):
        golden_sets({"s/images": images["digits"], "s/logits": references["digits"][0],
                     "s/kept_stage2": references["digits"][1][1]}, "test")


def test_debug_twin_names():
    assert debug_file_name("model_native_fp16.onnx") == "model_native_fp16.debug.onnx"
    assert debug_role("onnx_int8") == "onnx_int8_debug"


def test_run_batched_pads_with_the_sets_own_images_and_drops_the_padding():
    images = np.arange(5, dtype=np.float32).reshape(5, 1, 1, 1)
    fed = []

    def runner(feed):
        fed.append(feed[:, 0, 0, 0].tolist())
        return [feed.reshape(len(feed), 1) * 2.0]

    (out,) = run_batched(runner, images, 2)
    assert fed == [[0, 1], [2, 3], [4, 0]] and out[:, 0].tolist() == [0, 2, 4, 6, 8]
    fed.clear()
    (out,) = run_batched(runner, images, 8)  # a batch larger than the set: cycle through it
    assert fed == [[0, 1, 2, 3, 4, 0, 1, 2]] and len(out) == 5
    fed.clear()
    run_batched(runner, images)  # no batch: the whole set at once
    assert fed == [[0, 1, 2, 3, 4]]


def test_comparison_figures_and_verdicts():
    logits = np.array([[3.0, 1.0], [0.0, 2.0], [1.0, 0.5], [0.2, 0.1]], np.float32)
    kept = [np.array([[0, 1, 2]] * 4), np.array([[2, 0]] * 4)]
    assert top1_agreement(logits, logits[::-1]) == 0.5
    same = compare((logits, kept), [logits + 5e-5, *kept], "digits", 1e-4, batch=2)
    assert same.passed and same.kept_order_identical and same.kept_overlap == [1.0, 1.0] and same.batch == 2
    assert same.max_abs_error == pytest.approx(5e-5, rel=1e-2) and same.images == 4  # float32 rounding of 3 + 5e-5
    reordered = compare((logits, kept), [logits, kept[0][:, ::-1], kept[1]], "digits", 1e-4)
    assert reordered.passed and reordered.kept_sets_identical and not reordered.kept_order_identical
    one_token_swapped = [kept[0], np.array([[2, 1]] * 4)]
    changed = compare((logits, kept), [logits, *one_token_swapped], "digits", 1e-4)
    assert not changed.passed and changed.kept_overlap == [1.0, 0.5]
    assert not compare((logits, kept), [logits + 2e-4, *kept], "digits", 1e-4).passed
    flipped = logits.copy()
    flipped[0] = [0.0, 9.0]  # one of four images changes its class: 0.75 < 0.95
    reduced = compare((logits, kept), [flipped, *kept], "digits", None, 0.95)
    assert reduced.top1_agreement == 0.75 and not reduced.passed
    assert compare((logits, kept), [flipped, *kept], RANDOM_INPUTS, None, None).passed  # reported, not judged
    assert not compare((logits, kept), [logits * np.nan, *kept], RANDOM_INPUTS, None, None).passed  # never NaN
    assert kept_overlap(np.array([[1, 2]]), np.array([[1, 2, 3]])) == 0.0  # different counts: no overlap claimed
