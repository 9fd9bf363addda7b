"""ToMe: counts, the tie rule, parity with the reference implementation (golden data), the ONNX graphs."""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from compress.models import tome
from export.on_target.compare import onnxruntime_session, session_runner
from export.tome_export import MIN_TENSORRT_VERSION, ToMeExport, ToMeExportError, check_tensorrt_version

GOLDEN = Path(__file__).parent / "data" / "tome_reference.npz"
WEIGHT_SEED = {"deit_small_patch16_224": 1501, "deit_base_patch16_224": 1502}
PARITY_R = (8, 16)
PARITY_TOLERANCE = 1e-4  # max abs logit difference to the reference ToMe (float32, CPU)
TINY = dict(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)  # 65 tokens


# ----------------------------------------------------------------------------- deterministic inputs and weights


def seeded_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The random weights the golden data was produced with, rebuilt from ``seed``.

    Rule: numpy ``Generator(PCG64(seed))`` visits the state-dict keys in sorted order and draws
    ``standard_normal(shape, float32) * 0.02`` for each; LayerNorm weights (keys ending in ``norm.weight``,
    ``norm1.weight``, ``norm2.weight``) get 1.0 added.
    """
    generator = np.random.Generator(np.random.PCG64(seed))
    weights = {}
    for key, tensor in sorted(model.state_dict().items()):
        values = generator.standard_normal(tuple(tensor.shape), dtype=np.float32) * np.float32(0.02)
        if key.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
            values += np.float32(1.0)
        weights[key] = torch.from_numpy(values)
    return weights


def weights_sha256(weights: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].numpy().tobytes())
    return digest.hexdigest()


def images_from_bytes(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> float32 images, (p - 127.5) / 64 (the golden inputs are stored as bytes)."""
    return torch.from_numpy((pixels.astype(np.float32) - np.float32(127.5)) / np.float32(64.0))


def seeded_tome(model_name: str, r) -> tome.ToMeViT:
    model = tome.create_tome(model_name, r)
    model.load_state_dict(seeded_state_dict(model, WEIGHT_SEED[model_name]))
    return model.eval()


def final_groups(decisions: list[np.ndarray], counts: list[int]) -> np.ndarray:
    """Replay ``merge_decisions`` codes: the final token every input token ends up in, [B, counts[0]] int64.

    Implements the output order independently of the model: kept A tokens (even positions) ascending, then every B
    token (odd positions); a merged A token goes where its destination goes.
    """
    merging = [t for t, after in zip(counts, counts[1:]) if after < t]
    batch = decisions[0].shape[0] if decisions else 1
    where = np.tile(np.arange(counts[0]), (batch, 1))
    for codes, t in zip(decisions, merging):
        for row in range(batch):
            source, destination = np.divmod(codes[row], t)
            kept_even = [p for p in range(0, t, 2) if p not in set(source.tolist())]
            new = np.empty(t, dtype=np.int64)
            new[kept_even] = np.arange(len(kept_even))
            new[1::2] = len(kept_even) + np.arange(t // 2)
            new[source] = new[destination]
            where[row] = new[where[row]]
    return where


# ----------------------------------------------------------------------------- counts and schedules


def test_token_counts_of_deit_at_r16_end_at_11():
    counts = tome.token_counts(197, tome.parse_r_schedule(16, 12))
    assert counts == [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21, 11]
    assert tome.token_counts(197, (8,) * 12)[-1] == 101
    assert tome.token_counts(197, (0,) * 12) == [197] * 13
    assert tome.merges_in_block(21, 16) == 10 and tome.merges_in_block(2, 5) == 0


def test_schedule_parser_accepts_an_int_or_one_r_per_block_and_refuses_the_rest():
    assert tome.parse_r_schedule(3, 4) == (3, 3, 3, 3)
    assert tome.parse_r_schedule([4, 3, 2, 1], 4) == (4, 3, 2, 1)
    for bad in ([1, 2], -1, [1, 2, 3, -4], [1.5, 1, 1, 1]):
        with pytest.raises(tome.ToMeError):
            tome.parse_r_schedule(bad, 4)
    with pytest.raises(tome.ToMeError, match="at most 98"):
        tome.check_schedule_merges(197, (99,) * 12)
    tome.check_schedule_merges(197, (98,) * 12)  # later blocks cap r themselves, as the method defines


# ----------------------------------------------------------------------------- tie rule


def matching_oracle(distances: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tie rule written out with numpy, from the distances [B, nA, nB] of every A token (CLS = A 0) to every B
    token: (kept_a, merged_a, merged_into) as ``tome.Matching`` holds them."""
    best_b = distances.argmin(-1)  # numpy's argmin: the first minimum
    closest = distances.min(-1)
    kept, merged, into = [], [], []
    for row in range(len(distances)):
        order = 1 + np.argsort(closest[row, 1:], kind="stable")  # candidates by ascending distance, ties by index
        merged.append(order[:r])
        into.append(best_b[row, order[:r]])
        kept.append(np.concatenate([[0], np.sort(order[r:])]))
    return np.stack(kept), np.stack(merged), np.stack(into)


def tied_metric(batch: int, tokens: int, channels: int, distinct: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, tokens, channels] drawn from only ``distinct`` vectors: exact duplicates everywhere, so best matches
    and best distances tie exactly, many times over."""
    vectors = torch.randn(batch, distinct, channels, generator=generator)
    choice = torch.randint(0, distinct, (batch, tokens), generator=generator)
    return torch.gather(vectors, 1, choice[..., None].expand(-1, -1, channels))


def test_the_sorts_are_stable_on_values_with_many_ties():
    values = torch.randint(0, 4, (50, 40)).float()
    assert np.array_equal(tome.ascending_order(values).numpy(), np.argsort(values.numpy(), axis=1, kind="stable"))
    distinct = torch.stack([torch.randperm(40) for _ in range(50)])[:, :25]
    assert torch.equal(tome.ascending(distinct), distinct.sort(dim=1).values)


@pytest.mark.parametrize("distinct", [2, 3, 6, 1000])
def test_matching_follows_the_written_out_tie_rule(distinct):
    generator = torch.Generator().manual_seed(distinct)
    for tokens, r in ((65, 32), (65, 1), (64, 17), (21, 5)):
        metric = tied_metric(6, tokens, 8, distinct, generator)
        matching = tome.bipartite_soft_matching(metric, r)
        unit = metric / metric.norm(dim=-1, keepdim=True)
        distances = tome.cosine_distances(unit[:, ::2], unit[:, 1::2]).numpy()
        for got, expected in zip(matching, matching_oracle(distances, r)):
            assert np.array_equal(got.numpy(), expected)


def test_matching_ties_go_to_the_lower_index():
    # Every B token identical: every A token's best match is B index 0 (first maximum).
    # Every A token besides CLS identical: all best scores tie, so the lowest A indices merge.
    metric = torch.zeros(1, 11, 4)
    metric[:, 0] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # CLS
    metric[:, 2::2] = torch.tensor([1.0, 0.5, 0.0, 0.0])  # A candidates (positions 2, 4, 6, 8, 10)
    metric[:, 1::2] = torch.tensor([0.5, 1.0, 0.0, 0.0])  # B tokens (positions 1, 3, 5, 7, 9)
    matching = tome.bipartite_soft_matching(metric, 3)
    assert matching.merged_a.tolist() == [[1, 2, 3]]
    assert matching.merged_into.tolist() == [[0, 0, 0]]
    assert matching.kept_a.tolist() == [[0, 4, 5]]
    assert tome.merge_decisions(matching, 11).tolist() == [[2 * 11 + 1, 4 * 11 + 1, 6 * 11 + 1]]


def test_cls_is_never_merged_and_stays_first_even_when_it_matches_best():
    metric = torch.randn(3, 21, 8)
    metric[:, 0] = metric[:, 1]  # CLS identical to B token 0: the best score there is, yet protected
    matching = tome.bipartite_soft_matching(metric, 10)  # every candidate merges
    assert (matching.kept_a[:, 0] == 0).all() and matching.kept_a.shape == (3, 1)
    assert sorted(matching.merged_a[0].tolist()) == list(range(1, 11))


def test_merge_is_a_size_weighted_average_and_flavours_agree():
    x = torch.randn(2, 9, 5)
    size = torch.randint(1, 4, (2, 9, 1)).float()
    matching = tome.Matching(kept_a=torch.tensor([[0, 2], [0, 1]]), merged_a=torch.tensor([[1, 3, 4], [4, 2, 3]]),
                             merged_into=torch.tensor([[2, 2, 0], [1, 1, 1]]))
    merged, sizes = tome.merge_weighted_average(x, size, matching, "scatter")
    onehot, onehot_sizes = tome.merge_weighted_average(x, size, matching, "onehot")
    assert torch.allclose(merged, onehot, atol=1e-6) and torch.equal(sizes, onehot_sizes)
    # Row 0: B index 2 (position 5) receives A 1 and A 3 (positions 2 and 6); B 0 receives A 4 (position 8).
    group = [5, 2, 6]
    expected = (x[0, group] * size[0, group]).sum(0) / size[0, group].sum()
    assert torch.allclose(merged[0, 2 + 2], expected, atol=1e-6)
    assert sizes[0, 2 + 2, 0] == size[0, group].sum()
    assert torch.allclose(merged[0, 0], x[0, 0], atol=1e-6) and torch.allclose(merged[0, 1], x[0, 4], atol=1e-6)  # CLS, A 2
    assert merged.shape == (2, 6, 5) and torch.equal(sizes.sum((1, 2)), size.sum((1, 2)))  # mass is conserved


# ----------------------------------------------------------------------------- parity with the reference ToMe


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.mark.parametrize("model_name", ["deit_small_patch16_224",
                                        pytest.param("deit_base_patch16_224", marks=pytest.mark.slow)])
def test_parity_with_the_reference_tome_at_r8_and_r16(golden, model_name):
    """The reference ToMe (facebookresearch/ToMe, proportional attention) ran once on these seeded weights and
    images (see docs/tome.md); the project's ToMe must give the same logits and the same token groups."""
    images = images_from_bytes(golden["images_uint8"])
    model = seeded_tome(model_name, 0)
    assert weights_sha256(model.state_dict()) == str(golden[f"{model_name}/weights_sha256"]), \
        "the seeded weight rule no longer rebuilds the weights the golden data was made with"
    for r in PARITY_R:
        model.r_schedule = r
        with torch.no_grad():
            logits, decisions = model.forward_with_decisions(images)
        error = np.abs(logits.numpy() - golden[f"{model_name}/r{r}/logits"]).max()
        assert error <= PARITY_TOLERANCE, f"r {r}: max abs logit difference {error:.3g}"
        groups = final_groups([d.numpy() for d in decisions], model.token_counts())
        assert np.array_equal(groups, golden[f"{model_name}/r{r}/final_group"].astype(np.int64))
    assert model.token_counts()[-1] == 11


# ----------------------------------------------------------------------------- ONNX


def tiny_tome(r=0):
    return tome.create_tome("vit_small_patch16_224", r, **TINY)


def run_onnx(proto, images: torch.Tensor) -> list[np.ndarray]:
    return session_runner(onnxruntime_session(proto))(images.numpy())


@pytest.mark.parametrize("flavour", ["onehot", "scatter"])
def test_onnx_runtime_matches_pytorch_with_identical_decisions(flavour):
    model, method = tiny_tome(), ToMeExport([8, 4, 16, 2])
    deployed = method.deploy_copy(model, "fp32")
    proto = method.export_onnx(deployed, flavour, batch_size=2, dynamic_batch=True, opset=17, with_debug=True)
    assert [o.name for o in proto.graph.output] == ["logits", *method.debug_output_names(model)]
    ops = [node.op_type for node in proto.graph.node]
    assert not set(ops) & {"If", "Loop", "ScatterND"}
    assert ops.count("TopK") == 2 * 4  # per merging block: the ranking, then the kept indices in ascending order
    assert ("ScatterElements" in ops) == (flavour == "scatter")
    if flavour == "scatter":
        scatter = next(node for node in proto.graph.node if node.op_type == "ScatterElements")
        assert {a.name: a for a in scatter.attribute}["reduction"].s == b"add"
    assert any(method.float_scopes[0] in node.name for node in proto.graph.node)
    reference = method.reference(model)
    for batch in (3, 1):
        images = torch.randn(batch, 3, 64, 64)
        logits, decisions = reference(images)
        outputs = run_onnx(proto, images)
        assert np.abs(outputs[0] - logits).max() <= 1e-4
        assert len(outputs) - 1 == len(decisions) == 4
        for onnx_codes, torch_codes in zip(outputs[1:], decisions):
            assert onnx_codes.dtype == np.int64 and np.array_equal(onnx_codes, torch_codes)
    assert model.r_schedule == (0, 0, 0, 0)  # the export never changes the model it was given


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_each_merging_block_adds_few_operators(dynamic_batch):
    """The merge's fixed cost: operators (besides Constant and Identity) a merging block adds to the dense graph,
    proportional attention included. 37.6 / 35.6 (onehot / scatter) on DeiT-S at r 16; the comparison-count ranks
    and one-hot index reads this replaced added about 76. The bound leaves a little room, no more."""
    model = tiny_tome()

    def operators(r, flavour):
        method = ToMeExport(r)
        proto = method.export_onnx(method.deploy_copy(model, "fp32"), flavour, 2, dynamic_batch, 17, False)
        return sum(node.op_type not in ("Constant", "Identity") for node in proto.graph.node)

    dense = operators(0, "onehot")
    for flavour in tome.MERGE_FLAVOURS:
        assert (operators([8, 4, 16, 2], flavour) - dense) / 4 <= 40, flavour


def repeated_patch_images(patch: int, grid: int, generator: torch.Generator) -> torch.Tensor:
    """[6, 3, patch * grid, patch * grid] images tiled from a few patches: one patch everywhere; two in a
    checkerboard; three at random (twice: a duplicated image); six at random; and one random image."""
    def tiled(patterns: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
        tiles = patterns[layout]  # [grid, grid, 3, patch, patch]
        return tiles.permute(2, 0, 3, 1, 4).reshape(3, grid * patch, grid * patch)

    def patterns(count: int) -> torch.Tensor:
        return torch.randn(count, 3, patch, patch, generator=generator)

    rows = torch.arange(grid)
    random_three = tiled(patterns(3), torch.randint(0, 3, (grid, grid), generator=generator))
    return torch.stack([
        tiled(patterns(1), torch.zeros(grid, grid, dtype=torch.long)),
        tiled(patterns(2), (rows[:, None] + rows[None, :]) % 2),
        random_three, random_three,
        tiled(patterns(6), torch.randint(0, 6, (grid, grid), generator=generator)),
        torch.randn(3, grid * patch, grid * patch, generator=generator),
    ])


def test_repeated_patches_tie_exactly_and_every_graph_takes_the_eager_decisions():
    """Without position embeddings, images tiled from a few patches give exactly equal tokens, which stay equal
    through every block: the best matches and the ranking tie exactly in every merging block. ONNX Runtime (both
    flavours) must take eager PyTorch's decisions; the flavours must agree with each other."""
    model, method = tiny_tome(), ToMeExport([8, 4, 16, 2])
    with torch.no_grad():
        model.pos_embed.zero_()
    grid = TINY["img_size"] // TINY["patch_size"]
    images = repeated_patch_images(TINY["patch_size"], grid, torch.Generator().manual_seed(3))
    logits, decisions = method.reference(model)(images)
    # One patch everywhere: every candidate ties with every B token, so A 1..8 merge into B 0 (positions 2i and 1).
    assert decisions[0][0].tolist() == [2 * a * 65 + 1 for a in range(1, 9)]
    assert all(np.array_equal(codes[2], codes[3]) for codes in decisions)  # the duplicated image
    eager = {}
    for flavour in tome.MERGE_FLAVOURS:
        deployed = method.deploy_copy(model, "fp32")
        deployed.merge_flavour = flavour
        with torch.no_grad():
            eager[flavour] = deployed.forward_with_decisions(images)
        proto = method.export_onnx(deployed, flavour, batch_size=2, dynamic_batch=True, opset=17, with_debug=True)
        outputs = run_onnx(proto, images)
        assert np.abs(outputs[0] - logits).max() <= 1e-4
        for onnx_codes, torch_codes in zip(outputs[1:], decisions, strict=True):
            assert np.array_equal(onnx_codes, torch_codes)
    assert (eager["onehot"][0] - eager["scatter"][0]).abs().max() <= 1e-5
    assert all(torch.equal(a, b) for a, b in zip(eager["onehot"][1], eager["scatter"][1], strict=True))


def test_onnx_takes_the_same_decisions_on_real_images_whose_scores_crowd_near_one():
    """Digit backgrounds give many tokens cosine scores within a few float32 steps of each other just below 1; ranked
    by cosine score, ONNX Runtime and PyTorch reordered them (4 of 64 images merged other tokens). Ranked by the
    distances of the unit vectors they agree."""
    from compress.data.datasets import DemoDigits
    from compress.models.checkpoint import demo_checkpoint_path

    model, _ = tome.load_tome(demo_checkpoint_path(), 8)
    data = DemoDigits("test", random_placement=False)
    images = torch.stack([data[i][0] for i in range(64)])
    method = ToMeExport(8)
    proto = method.export_onnx(method.deploy_copy(model, "fp32"), "onehot", 1, True, 17, True)
    outputs = run_onnx(proto, images)
    logits, decisions = method.reference(model)(images)
    assert np.abs(outputs[0] - logits).max() <= 1e-4
    assert all(np.array_equal(a, b) for a, b in zip(outputs[1:], decisions))


def test_cosine_distances_order_like_cosine_scores():
    metric = torch.nn.functional.normalize(torch.randn(2, 9, 16), dim=-1)
    a, b = metric[:, ::2], metric[:, 1::2]
    distances = tome.cosine_distances(a, b)
    assert torch.allclose(distances, 2 - 2 * a @ b.transpose(1, 2), atol=1e-5)
    assert torch.equal(distances.argmin(-1), (a @ b.transpose(1, 2)).argmax(-1))


class MatchingGraph(torch.nn.Module):
    """metric -> merge codes: the matching alone, to feed ONNX constructed ties."""

    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def forward(self, metric):
        return tome.merge_decisions(tome.bipartite_soft_matching(metric, self.r), metric.shape[1])


def test_onnx_follows_the_tie_rule_on_constructed_ties():
    metric = torch.zeros(2, 11, 4)
    metric[:, 2::2] = torch.tensor([1.0, 0.5, 0.0, 0.0])  # every A candidate ties
    metric[:, 1::2] = torch.tensor([0.5, 1.0, 0.0, 0.0])  # every B token ties
    metric[:, 0] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    metric[1, 7] = torch.tensor([1.0, 0.5, 0.0, 0.0])  # row 1: B index 3 is the exact match of every candidate
    metric[1, 8] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # row 1: A index 4 matches nothing well
    from export.tome_export import export_module

    proto = export_module(MatchingGraph(3).eval(), metric, ["codes"], dynamic_batch=False, opset=17)
    onnx_codes = session_runner(onnxruntime_session(proto))(metric.numpy())[0]
    expected = [[2 * 11 + 1, 4 * 11 + 1, 6 * 11 + 1], [2 * 11 + 7, 4 * 11 + 7, 6 * 11 + 7]]
    assert MatchingGraph(3)(metric).tolist() == expected
    assert onnx_codes.tolist() == expected


def test_onnx_matching_takes_the_eager_decisions_on_exact_ties():
    """Duplicated tokens tie exactly in the best match and in the ranking; ONNX Runtime's ArgMin and TopK must break
    the ties as eager PyTorch's first minimum and stable sort do (random tokens: the same, without ties)."""
    from export.tome_export import export_module

    generator = torch.Generator().manual_seed(7)
    for tokens, r in ((65, 32), (65, 9), (22, 10)):
        metrics = [tied_metric(4, tokens, 8, distinct, generator) for distinct in (2, 5)]
        metrics.append(torch.randn(4, tokens, 8, generator=generator))
        proto = export_module(MatchingGraph(r).eval(), metrics[0], ["codes"], dynamic_batch=True, opset=17)
        run = session_runner(onnxruntime_session(proto))
        for metric in metrics:
            assert np.array_equal(run(metric.numpy())[0], MatchingGraph(r)(metric).numpy())


def test_float16_graph_keeps_the_merge_in_float32_and_stays_close():
    model, method = tiny_tome(), ToMeExport(8)
    proto = method.export_onnx(method.deploy_copy(model, "fp16"), "onehot", 4, False, 17, True)
    merge_inputs = [node for node in proto.graph.node if node.name.startswith("/token_merge") and node.op_type == "MatMul"]
    types = {value.name: value.type.tensor_type.elem_type for value in proto.graph.value_info}
    assert merge_inputs and all(types.get(name, 1) == 1 for node in merge_inputs for name in node.input)  # 1: float32
    images = torch.randn(4, 3, 64, 64)
    outputs = run_onnx(proto, images)
    logits, _ = method.reference(model)(images)
    assert np.isfinite(outputs[0]).all() and np.abs(outputs[0] - logits).max() <= 1e-2


def test_manifest_entry_macs_and_tensorrt_minimum():
    model, method = tome.create_tome("deit_small_patch16_224"), ToMeExport(16)
    entry = method.describe(model)
    assert entry["tokens_per_block"][-1] == 11 and entry["r_schedule"] == [16] * 12
    assert entry["merges_per_block"] == [16] * 11 + [10]
    dense, merged = ToMeExport(0).macs(model), method.macs(model)
    assert 4.55e9 < dense < 4.65e9 and 0.45 * dense < merged < 0.52 * dense  # DeiT-S: 4.6 GMACs dense
    assert ToMeExport(0).debug_output_names(model) == [] and len(method.debug_output_names(model)) == 12
    check_tensorrt_version("scatter", "10.3.0.30")
    with pytest.raises(ToMeExportError, match=MIN_TENSORRT_VERSION["scatter"]):
        check_tensorrt_version("scatter", "8.6.1")
    with pytest.raises(ToMeExportError, match="flavour"):
        method.export_onnx(method.deploy_copy(tiny_tome(), "fp32"), "topk", 1, False, 17, False)


@pytest.mark.slow
def test_onnx_runtime_deit_s_agrees_with_the_reference_tome(golden):
    images = images_from_bytes(golden["images_uint8"])
    model, method = seeded_tome("deit_small_patch16_224", 0), ToMeExport(16)
    proto = method.export_onnx(method.deploy_copy(model, "fp32"), "onehot", 2, False, 17, True)
    outputs = run_onnx(proto, images)
    assert np.abs(outputs[0] - golden["deit_small_patch16_224/r16/logits"]).max() <= PARITY_TOLERANCE
    groups = final_groups(outputs[1:], tome.token_counts(197, (16,) * 12))
    assert np.array_equal(groups, golden["deit_small_patch16_224/r16/final_group"].astype(np.int64))


# ----------------------------------------------------------------------------- checkpoints


def test_load_tome_reads_deit_style_checkpoints_and_refuses_mismatches(tmp_path):
    import timm

    from compress.plumbing.errors import CheckpointError

    # Weights do not record the head count: read from weights it is DeiT's width / 64 (here 2, as built).
    backbone = timm.create_model("vit_small_patch16_224", pretrained=False, **{**TINY, "embed_dim": 128}).eval()
    weights = backbone.state_dict()
    torch.save({"model": {"module." + k: v for k, v in weights.items()}}, tmp_path / "wrapped.pth")
    torch.save(weights, tmp_path / "bare.pth")
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = backbone(images)
    for name in ("wrapped.pth", "bare.pth"):
        model, notes = tome.load_tome(tmp_path / name, 0, model_name=None)
        assert any("head count assumed width/64 = 2" in note for note in notes)
        with torch.no_grad():
            assert (model(images) - expected).abs().max() <= 1e-5  # r 0 is the backbone itself
        assert model.embed_dim == 128 and len(model.blocks) == 4 and model.num_classes == 10
    merged, _ = tome.load_tome(tmp_path / "bare.pth", [4, 4, 2, 0])
    assert merged.token_counts() == [65, 61, 57, 55, 55]
    del weights["blocks.3.mlp.fc2.bias"]
    torch.save(weights, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match="blocks.3.mlp.fc2.bias"):
        tome.load_tome(tmp_path / "broken.pth")
    with pytest.raises(tome.ToMeError, match="at most 32"):
        tome.load_tome(tmp_path / "bare.pth", 40)


def test_the_demo_dynamicvit_checkpoint_runs_as_a_tome_model():
    from compress.models.checkpoint import demo_checkpoint_path

    model, notes = tome.load_tome(demo_checkpoint_path(), 16)
    assert any("prediction-module" in note for note in notes)
    assert model.token_counts() == [65, 49, 33, 17, 9, 5, 3]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 10)
