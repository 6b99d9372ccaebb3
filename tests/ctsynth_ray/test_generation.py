"""The translator feeds a generator exactly what it was trained on, whatever the batch."""

import numpy as np
import pytest
import torch

from ctsynth_ray.errors import CtsynthError
from ctsynth_ray.gan_data import pairs_from_crop
from ctsynth_ray.generation import Translator, check_generator_fits
from ctsynth_ray.labels import Tissue, encode_labels, n_classes


class Recorder(torch.nn.Module):
    """A 'generator' that remembers its inputs and returns their first channel."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return x[:, :1]


def info(dims, encoding="scalar", scheme="body", stack=3):
    return {"dims": dims, "label_scheme": scheme, "label_encoding": encoding, "stack_slices": stack}


def label_volume(shape=(8, 6, 5)):
    label = np.random.default_rng(0).choice([0, 1, 2, 3, 4, 6], shape).astype(np.uint8)  # no nodule
    return np.asfortranarray(label)  # as NIfTI volumes are


@pytest.mark.parametrize("dims, encoding", [("2", "scalar"), ("2", "onehot"), ("2.5", "scalar"), ("2.5", "onehot")])
def test_slice_inputs_are_the_training_pairs(dims, encoding):
    label = label_volume()
    recorder = Recorder()
    Translator(recorder, info(dims, encoding), batch=3, bf16=False).translate([label])
    seen = torch.cat(recorder.seen).numpy()
    kind = "2d" if dims == "2" else "2p5d"
    air = int(Tissue.OUTSIDE_AIR)
    padded = np.pad(label, ((0, 0), (0, 0), (1, 1)), constant_values=air) if kind == "2p5d" else None
    for z in range(label.shape[2]):  # every slice, as prepare makes the pairs of nodule slices
        if kind == "2d":
            expected = encode_labels(label[:, :, z], "body", encoding)
        else:
            stack = np.moveaxis(padded[:, :, z : z + 3], 2, 0)
            expected = encode_labels(stack, "body", encoding).reshape(-1, *label.shape[:2])
        np.testing.assert_array_equal(seen[z], expected)
    crop = label.copy()
    crop[2, 2, 1] = Tissue.NODULE  # pairs_from_crop's own stack for that slice is the same
    ((_, pair, _),) = list(pairs_from_crop(crop, np.zeros(crop.shape, np.int16), kind, 3, air))
    recorder.seen.clear()
    Translator(recorder, info(dims, encoding), bf16=False).translate([crop])
    channels = n_classes("body") if encoding == "onehot" else 1
    expected = encode_labels(pair, "body", encoding)
    np.testing.assert_array_equal(recorder.seen[0][1].numpy(), expected.reshape(-1, *crop.shape[:2]))
    assert recorder.seen[0].shape[1] == channels * (3 if kind == "2p5d" else 1)


def test_output_is_hu_on_the_volume_grid_and_does_not_depend_on_the_batch():
    generator = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 1, 1))
    labels = [label_volume(), label_volume()[::-1].copy(order="F")]
    one = Translator(generator, info("2"), batch=1).translate(labels)
    many = Translator(generator, info("2"), batch=64).translate(labels)
    for a, b, label in zip(one, many, labels):
        assert a.dtype == np.int16 and a.shape == label.shape and a.flags.f_contiguous
        np.testing.assert_array_equal(a, b)
    volume = Translator(torch.nn.Identity(), info("3"), bf16=False).translate([labels[0]])[0]
    np.testing.assert_array_equal(volume, np.rint((labels[0] / 3.0 - 1.0) * 2000).clip(-1024, 3071))


def test_a_generator_that_does_not_fit_is_named():
    unet = {"network": {"architecture": "unet", "in_channels": 1, "arguments": {"n_down": 5}}, "size": 32, **info("2")}
    check_generator_fits(unet, 64, "body")
    with pytest.raises(CtsynthError, match="--size 48 does not fit the generator"):
        check_generator_fits(unet, 48, "body")
    with pytest.raises(CtsynthError, match="trained on body label maps, the source has thesis ones"):
        check_generator_fits(unet, 64, "thesis")
    stacked = {**unet, **info("2.5", "onehot")}
    with pytest.raises(CtsynthError, match="takes 1 input channels, but onehot body labels of 3 slice"):
        check_generator_fits(stacked, 64, "body")
