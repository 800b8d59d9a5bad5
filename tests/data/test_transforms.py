import albumentations as A
import numpy as np
import pytest
import torch
import yaml

from pipeline.data.transforms import build_transforms, is_random
from pipeline.errors import UserError

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

SPEC_YAML = """
- {name: RandomResizedCrop, size: [64, 64], scale: [0.6, 1.0]}
- {name: HorizontalFlip, p: 0.5}
- name: OneOf
  p: 0.5
  transforms:
    - {name: GaussianBlur}
    - {name: ColorJitter}
"""


def _build(spec):
    return build_transforms(spec, field="data.train_transforms", mean=MEAN, std=STD)


def test_yaml_list_builds_compose_ending_in_normalize_and_tensor():
    compose = _build(yaml.safe_load(SPEC_YAML))
    assert isinstance(compose, A.Compose)
    names = [type(t).__name__ for t in compose.transforms]
    assert names == ["RandomResizedCrop", "HorizontalFlip", "OneOf", "Normalize", "ToTensorV2"]


def test_output_is_float_chw_tensor_of_the_crop_size():
    image = np.random.default_rng(0).integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    out = _build(yaml.safe_load(SPEC_YAML))(image=image)["image"]
    assert isinstance(out, torch.Tensor)
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32


def test_empty_spec_only_normalizes():
    image = np.full((4, 4, 3), 255, dtype=np.uint8)
    out = _build([])(image=image)["image"]
    expected = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)])
    torch.testing.assert_close(out[:, 0, 0], expected)


def test_bbox_params_are_passed_through():
    compose = build_transforms([{"name": "HorizontalFlip", "p": 1.0}], field="f", mean=MEAN, std=STD,
                               bbox_params=A.BboxParams(format="coco", label_fields=["labels"]))
    out = compose(image=np.zeros((10, 20, 3), np.uint8), bboxes=[[0, 0, 5, 5]], labels=[1])
    np.testing.assert_allclose(out["bboxes"][0], [15, 0, 5, 5])


def test_unknown_name_suggests_close_names():
    with pytest.raises(UserError, match=r"data\.train_transforms\[1\].*'HorizonalFlip'.*HorizontalFlip"):
        _build([{"name": "Resize", "height": 8, "width": 8}, {"name": "HorizonalFlip"}])


def test_bad_parameter_value_names_index_transform_and_reason():
    with pytest.raises(UserError) as info:
        _build([{"name": "HorizontalFlip"}, {"name": "RandomResizedCrop", "size": [64, 64], "scale": [1.5, 0.2]}])
    message = str(info.value)
    assert "data.train_transforms[1]" in message and "RandomResizedCrop" in message and "scale" in message
    assert "\n" not in message


def test_missing_required_parameter_is_reported():
    with pytest.raises(UserError, match=r"\[0\].*RandomResizedCrop.*size"):
        _build([{"name": "RandomResizedCrop"}])


def test_misspelt_argument_is_an_error_not_a_warning():
    with pytest.raises(UserError, match=r"\[0\].*scael.*valid arguments: size, scale"):
        _build([{"name": "RandomResizedCrop", "size": [8, 8], "scael": [0.5, 1.0]}])


def test_nested_child_errors_name_their_path():
    with pytest.raises(UserError, match=r"data\.train_transforms\[0\]\.transforms\[1\].*Blurr"):
        _build([{"name": "OneOf", "transforms": [{"name": "Blur"}, {"name": "Blurr"}]}])


def test_normalize_in_spec_is_rejected_because_it_is_appended():
    with pytest.raises(UserError, match=r"\[1\].*Normalize is added automatically"):
        _build([{"name": "HorizontalFlip"}, {"name": "Normalize"}])


def test_entry_without_name_is_rejected():
    with pytest.raises(UserError, match=r"\[0\].*'name'"):
        _build([{"p": 0.5}])


@pytest.mark.parametrize("spec, expected", [
    ([], False),
    ([{"name": "Resize", "height": 8, "width": 8}, {"name": "CenterCrop", "height": 4, "width": 4}], False),
    ([{"name": "ToGray", "p": 1.0}], False),
    ([{"name": "ToGray"}], True),  # ToGray defaults to p=0.5
    ([{"name": "Resize", "height": 8, "width": 8, "p": 0.5}], True),
    ([{"name": "HorizontalFlip", "p": 1.0}, {"name": "Resize", "height": 8, "width": 8}], False),
    ([{"name": "Resize", "height": 8, "width": 8}, {"name": "HorizontalFlip"}], True),
    ([{"name": "RandomResizedCrop", "size": [8, 8]}], True),
    ([{"name": "OneOf", "p": 1.0, "transforms": [{"name": "Resize", "height": 8, "width": 8}]}], True),
    ([{"name": "Sequential", "p": 1.0, "transforms": [{"name": "Resize", "height": 8, "width": 8}]}], False),
])
def test_is_random(spec, expected):
    assert is_random(spec) is expected
