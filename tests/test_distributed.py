"""Two CPU processes under torchrun (gloo on 127.0.0.1): DDP training ends with identical weights on both ranks."""
import torch

RANK_SCRIPT = """
    import os, sys
    import torch
    from compress.training.train import TrainConfig, train

    out, mode = sys.argv[1], sys.argv[2]
    result = train(TrainConfig(mode=mode, out=out, embed_dim=32, depth=4, num_heads=2, epochs=1, batch_size=16,
                               limit_train=96, limit_eval=40, lr=1e-3, warmup_epochs=0.5, backbone_frozen_epochs=0,
                               ema_decay=0.9, device="cpu"))
    torch.save({"step": result.step, "model": result.model.state_dict()}, f"{out}/rank{os.environ['RANK']}.pt")
"""


def _assert_same(rank0: dict, rank1: dict) -> None:
    assert rank0["step"] == rank1["step"] == 3  # 96 images / 2 ranks / 16 per step
    for name, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][name]), name


def test_dynamicvit_ddp_two_cpu_processes_end_with_identical_weights(torchrun):
    out, (rank0, rank1) = torchrun(RANK_SCRIPT, "dynamicvit")
    _assert_same(rank0, rank1)
    written = torch.load(out / "model.pth", weights_only=True)  # rank 0 wrote it
    assert written["training"]["world_size"] == 2
    for name, value in rank0["model"].items():
        assert torch.equal(value, written["model"][name]), name


def test_masked_ft_ddp_two_cpu_processes_end_with_identical_weights(torchrun):
    """Prediction modules take no part in masked/dense training: DDP must not wait for their gradients."""
    _assert_same(*torchrun(RANK_SCRIPT, "masked")[1])


REDUCE_SCRIPT = """
    import sys
    import torch
    from compress.training.loop import all_reduce_named, init_distributed, shutdown_distributed

    env = init_distributed("cpu")
    terms = {"loss": 1.0 + env.rank, "kl": 10.0 * (env.rank + 1)}
    if env.rank == 1:
        terms = dict(reversed(terms.items()))  # another order on each rank: matched by name, not position
    torch.save(all_reduce_named(terms, env), f"{sys.argv[1]}/rank{env.rank}.pt")
    shutdown_distributed()
"""


def test_named_terms_are_summed_over_ranks_by_name(torchrun):
    _, reduced = torchrun(REDUCE_SCRIPT)
    assert reduced == [{"kl": 30.0, "loss": 3.0}] * 2
