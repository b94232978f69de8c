"""Advice on a training run's settings, logged when it starts (docs/method.md, Stages): pure
functions of config values, each a warning naming the config key to change, or None."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


# Above this rate, training from pretrained weights lost their head start on held-out sets.
FINE_TUNING_LR = 3.5e-4


def fine_tuning_advice(pretrained: str, lr: float) -> str | None:
    """A warning when pretrained weights (ImageNet, source-pretrained or a file) are trained at a
    from-scratch learning rate (None otherwise).

    Measured: from source-pretrained weights on a held-out 6-camera set (start 15.6 % mAP), the
    teacher at train.lr 1e-3 rose to 20.0 % by epoch 3 and ended at 15.0 %, below its start;
    at the paper's fine-tuning rate 3.5e-4 it ended at 20.0 %.
    """
    if pretrained == "none" or lr <= 1.5 * FINE_TUNING_LR:
        return None
    return (f"starting from pretrained weights (model.pretrained={pretrained}) at train.lr={lr:g}, a from-scratch "
            f"rate: such runs can end below their start; set config key 'train.lr' near {FINE_TUNING_LR:g} "
            "(the paper's fine-tuning rate)")


# The paper pads 10 px around a 128-px-wide input before its random crop: shifts of up to 8 %.
PAPER_CROP_SHIFT = 10 / 128


def crop_pad_advice(crop_pad: int, width: int) -> str | None:
    """A warning when the crop augmentation shifts images by far more of their width than the
    paper's (None otherwise).

    Measured: on four held-out sets at 64x32, the paper's 10 px (shifts of up to 31 % of the
    width) left the teachers at 11.9-15.7 % mAP where a 2 px border gave 14.8-36.2 %.
    """
    if crop_pad <= 2 * PAPER_CROP_SHIFT * width:
        return None
    scaled = max(1, round(PAPER_CROP_SHIFT * width))
    return (f"train.crop_pad={crop_pad} px shifts the {width}-px-wide input by up to {crop_pad / width:.0%} of its "
            f"width, the paper's 10 px at 128 px by 8 %: such strong crops slow learning; set config key "
            f"'train.crop_pad' near {scaled} (scaled to data.width)")


def schedule_advice(step_size: int, epochs: int, gamma: float, key: str) -> str | None:
    """A warning when a step schedule decays the learning rate three or more times within a run
    of `epochs` scheduler steps (the paper's 50 epochs with step 20 decay twice); None otherwise.

    `key` names the config key that set `step_size` (train.step_size or student.step_size):
    config.yaml's student.step_size 6 suits its 8 epochs but freezes a lengthened run.
    """
    decays = (epochs - 1) // step_size  # the last epoch runs at lr * gamma ** decays
    if decays < 3 or gamma >= 1:
        return None
    return (f"{key}={step_size} decays the learning rate {decays} times over {epochs} epochs (to "
            f"{gamma ** decays:.0e} x train.lr in the last): the last epochs barely train; set config key "
            f"'{key}' near two thirds of the epochs ({max(1, round(2 * epochs / 3))})")


def settings_advice(config: Mapping[str, Any], step_size: int, step_key: str, epochs: int) -> list[str]:
    """The warnings about a run's settings at its start: the learning rate for pretrained weights,
    the crop border, the step schedule over the run's `epochs` scheduler steps (`step_size` set
    by config key `step_key`)."""
    train = config["train"]
    found = (fine_tuning_advice(config["model"]["pretrained"], train["lr"]),
             crop_pad_advice(train["crop_pad"], config["data"]["width"]),
             schedule_advice(step_size, epochs, train["gamma"], step_key))
    return [advice for advice in found if advice]
