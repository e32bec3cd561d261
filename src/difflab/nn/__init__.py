"""Networks: the diffusion U-Net, the noisy-image classifier, their blocks and presets."""

from difflab.nn.classifier import Classifier, ClassifierConfig
from difflab.nn.presets import PRESETS, build_network, get_preset
from difflab.nn.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "Classifier", "ClassifierConfig", "PRESETS", "build_network", "get_preset"]
