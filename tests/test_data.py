"""The built-in demo dataset (scikit-learn digits on a canvas) and the image-folder path."""
import pytest
import torch

from compress.data.datasets import DataError, DemoDigits, build_datasets, demo_dataset, demo_split_indices


def test_split_is_fixed_disjoint_and_complete():
    train, test = demo_split_indices(1797)
    again_train, again_test = demo_split_indices(1797)
    assert torch.equal(train, again_train) and torch.equal(test, again_test)
    assert len(train) == 1438 and len(test) == 359
    assert set(train.tolist()).isdisjoint(test.tolist()) and len(set(train.tolist()) | set(test.tolist())) == 1797


def test_test_images_are_fixed_three_channel_and_mostly_background():
    data = demo_dataset("test")
    image, label = data[5]
    again, _ = DemoDigits("test")[5]
    assert image.shape == (3, 64, 64) and torch.equal(image, again) and 0 <= label < 10
    assert float(image.min()) >= -1.0 and float(image.max()) <= 1.0
    # 8x8 patches holding ink: a 32-pixel digit touches at most 5 x 5 of the 64 patches
    ink = (image[0] > 0.0).reshape(8, 8, 8, 8).permute(0, 2, 1, 3).reshape(64, 64).any(dim=1)
    assert 1 <= int(ink.sum()) <= 25


def test_training_split_moves_digits_but_keeps_labels():
    data = DemoDigits("train")
    torch.manual_seed(0)
    first, label = data[0]
    second, label_again = data[0]
    assert label == label_again and not torch.equal(first, second)


def test_build_datasets_demo_and_missing_folder(tmp_path):
    train, test, spec = build_datasets("demo-digits")
    assert (len(train), len(test), spec.num_classes, spec.image_size) == (1438, 359, 10, 64)
    with pytest.raises(DataError, match="not found"):
        build_datasets(str(tmp_path / "missing"))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="class folder"):
        build_datasets(str(tmp_path))
    from PIL import Image

    (tmp_path / "train" / "cat").mkdir()
    Image.new("RGB", (32, 32)).save(tmp_path / "train" / "cat" / "one.png")
    with pytest.raises(DataError, match="'val'"):
        build_datasets(str(tmp_path))
