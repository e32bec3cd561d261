"""Networks: the diffusion U-Net, GLIDE's text encoder and text U-Net, the noisy-image classifier, their
blocks and presets."""

from difflab.nn.classifier import Classifier, ClassifierConfig
from difflab.nn.presets import PRESETS, build_network, get_preset
from difflab.nn.text import TextEncoderConfig, TextTransformer
from difflab.nn.text_unet import TextUNet, TextUNetConfig
from difflab.nn.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "TextEncoderConfig", "TextTransformer", "TextUNet", "TextUNetConfig",
           "Classifier", "ClassifierConfig", "PRESETS", "build_network", "get_preset"]
