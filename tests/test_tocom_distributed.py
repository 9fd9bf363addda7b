"""ToCom training under torchrun: two CPU processes (gloo on 127.0.0.1) end with the same plugin."""
import torch

from compress import create_dynamicvit

from compress.models import tocom_files

from compress.models.checkpoint import save_dynamicvit

RANK_SCRIPT = """
    import os, sys
    import torch
    from compress.training.tocom_train import ToComTrainConfig, train

    out = sys.argv[1]
    result = train(ToComTrainConfig(checkpoint=sys.argv[2], out=out, epochs=1, batch_size=16, limit_train=80,
                                    limit_eval=32, lr=3e-3, warmup_epochs=0.5, device="cpu", eval_keeps=(0.9, 0.5),
                                    scales=(0.1,)))
    torch.save({"step": result.steps, "plugin": result.plugin.state_dict()}, f"{out}/rank{os.environ['RANK']}.pt")
"""


def test_tocom_training_ddp_two_cpu_processes_end_with_identical_plugins(tmp_path, torchrun):
    torch.manual_seed(0)
    model = create_dynamicvit("vit_small_patch16_224", 0.7, None, img_size=64, patch_size=8, embed_dim=32, depth=4,
                              num_heads=2, num_classes=10)
    with torch.no_grad():
        model.head.weight.mul_(30.0)
    checkpoint = tmp_path / "dvit.pth"
    save_dynamicvit(model, checkpoint)
    out, (rank0, rank1) = torchrun(RANK_SCRIPT, checkpoint)
    assert rank0["step"] == rank1["step"] == 2  # 64 training images (16 held out) / 2 ranks / 16 per step
    for name, value in rank0["plugin"].items():
        assert torch.equal(value, rank1["plugin"][name]), name
    written, _ = tocom_files.load_plugin(out / "tocom.safetensors")  # rank 0 wrote it
    for name, value in written.state_dict().items():
        assert torch.equal(value, rank0["plugin"][name]), name
    assert written.info.extra["training"]["world_size"] == 2
    assert any(float(v.abs().max()) > 0 for k, v in rank0["plugin"].items() if k.endswith("_up"))
