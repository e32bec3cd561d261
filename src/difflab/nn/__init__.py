"""Networks: the diffusion U-Net, GLIDE's text encoder and text U-Net, the noisy-image classifier, unCLIP's
(Karlo's) prior, decoder and upsampler, their blocks and presets."""

from difflab.nn.classifier import Classifier, ClassifierConfig
from difflab.nn.clip_unet import DecoderUNet, DecoderUNetConfig
from difflab.nn.presets import PRESETS, build_network, get_preset
from difflab.nn.prior import PriorConfig, PriorTransformer
from difflab.nn.progressive_sr import ProgressiveSR, ProgressiveSRConfig
from difflab.nn.text import TextEncoderConfig, TextTransformer
from difflab.nn.text_unet import TextUNet, TextUNetConfig
from difflab.nn.unet import UNet, UNetConfig

__all__ = ["UNet", "UNetConfig", "TextEncoderConfig", "TextTransformer", "TextUNet", "TextUNetConfig",
           "Classifier", "ClassifierConfig", "PriorConfig", "PriorTransformer", "DecoderUNet", "DecoderUNetConfig",
           "ProgressiveSR", "ProgressiveSRConfig", "PRESETS", "build_network", "get_preset"]
