"""Convert Flow Lune models between diffusers and the original (LDM) single-file layout.

Every key is accounted for in both directions: a key that maps nowhere, a destination key left
empty, or a wrong shape is a :class:`ConversionError` that lists the keys. See DESIGN.md section 7.
"""

from .errors import ConversionError
from .inspect_model import InspectReport, UnetComparison, compare_unets, inspect_path
from .keymaps import KeyPair, text_encoder_key_pairs, unet_key_pairs, vae_key_pairs
from .to_diffusers import convert_to_diffusers
from .to_single_file import ConversionResult, convert_to_single_file, editor_workflow_path, workflow_path
from .workflow import comfyui_editor_graph, comfyui_pnginfo, comfyui_workflow

__all__ = [
    "ConversionError",
    "ConversionResult",
    "InspectReport",
    "KeyPair",
    "UnetComparison",
    "comfyui_editor_graph",
    "comfyui_pnginfo",
    "comfyui_workflow",
    "compare_unets",
    "convert_to_diffusers",
    "convert_to_single_file",
    "editor_workflow_path",
    "inspect_path",
    "text_encoder_key_pairs",
    "unet_key_pairs",
    "vae_key_pairs",
    "workflow_path",
]
