import pytest
import torch

from compress import create_dynamicvit


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_model():
    """DeiT-Tiny DynamicViT (random weights, eval mode): the real architecture, small enough for CI."""
    return create_dynamicvit("dynamicvit_deit_tiny", keep_ratio=0.7).eval()
