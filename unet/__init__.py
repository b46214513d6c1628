"""The ADM / IDDPM U-Net and classifier, with the attention seam (see DESIGN.md)."""
from .attention import AttentionBlock, attention_weights, official_sag_map
from .classifier import AttentionPool2d, EncoderUNet
from .config import ConfigError, EncoderUNetConfig, UNetConfig
from .layers import ResBlock, timestep_embedding
from .model import AttentionSite, AttentionSiteError, UNet, UNetOutput
from .seam import AttentionMap, BlurQueries, Capture, IdentityAttention, OfficialCapture

__all__ = [
    "AttentionBlock", "AttentionMap", "AttentionPool2d", "AttentionSite", "AttentionSiteError", "BlurQueries",
    "Capture", "ConfigError", "EncoderUNet", "EncoderUNetConfig", "IdentityAttention", "OfficialCapture",
    "ResBlock", "UNet", "UNetConfig", "UNetOutput", "attention_weights", "official_sag_map", "timestep_embedding",
]
