"""Key tables between diffusers and the original (LDM) single-file layout, one function per component.

Each function takes the component's config and the diffusers state-dict shapes that the config
implies (see :func:`flow_lune.convert.architecture.expected_shapes`) and returns one
:class:`KeyPair` per tensor. The block tables are built from the config (number of blocks,
``layers_per_block``, which blocks have attention), so they hold for SD1.5 and for the tiny test
models alike. A diffusers key that no table row covers is an error, never a silent drop.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConversionError, format_keys

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
LDM_PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": TEXT_PREFIX}

Shape = tuple[int, ...]


@dataclass(frozen=True)
class KeyPair:
    """One tensor in both layouts; the shapes differ only where LDM stores a linear map as a 1x1 conv."""

    diffusers: str
    ldm: str  # without the component prefix (``model.diffusion_model.`` and such)
    diffusers_shape: Shape
    ldm_shape: Shape


# Inside a ResNet block: diffusers name -> LDM ``ResBlock`` name.
UNET_RESNET_RENAMES = (
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("time_emb_proj.", "emb_layers.1."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("conv_shortcut.", "skip_connection."),
)

# Inside a VAE ResNet block and the VAE mid attention: diffusers name -> LDM name.
VAE_RESNET_RENAMES = (("conv_shortcut.", "nin_shortcut."),)
VAE_ATTENTION_RENAMES = (
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
)


def _has_attention(block_type: str) -> bool:
    return block_type.startswith("CrossAttn")


def unet_block_table(config: dict) -> list[tuple[str, str, str]]:
    """Rows ``(diffusers_prefix, ldm_prefix, kind)`` for a UNet2DConditionModel of SD1 layout.

    LDM numbers ``input_blocks`` 1.. with ``layers_per_block`` ResNets (+ attention) per level and
    one downsampler after each level but the last; ``output_blocks`` have ``layers_per_block + 1``
    ResNets per level, the upsampler sitting in the level's last row after its attention.
    """
    per_level = int(config["layers_per_block"])
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    rows = [
        ("conv_in.", "input_blocks.0.0.", "plain"),
        ("time_embedding.linear_1.", "time_embed.0.", "plain"),
        ("time_embedding.linear_2.", "time_embed.2.", "plain"),
        ("mid_block.resnets.0.", "middle_block.0.", "resnet"),
        ("mid_block.attentions.0.", "middle_block.1.", "attention"),
        ("mid_block.resnets.1.", "middle_block.2.", "resnet"),
        ("conv_norm_out.", "out.0.", "plain"),
        ("conv_out.", "out.2.", "plain"),
    ]
    for i, block_type in enumerate(down_types):
        for j in range(per_level):
            row = 1 + i * (per_level + 1) + j
            rows.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{row}.0.", "resnet"))
            if _has_attention(block_type):
                rows.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{row}.1.", "attention"))
        if i < len(down_types) - 1:
            rows.append(
                (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per_level + 1)}.0.op.", "plain")
            )
    for i, block_type in enumerate(up_types):
        for j in range(per_level + 1):
            row = i * (per_level + 1) + j
            rows.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{row}.0.", "resnet"))
            if _has_attention(block_type):
                rows.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{row}.1.", "attention"))
        if i < len(up_types) - 1:
            last_row = i * (per_level + 1) + per_level
            slot = 2 if _has_attention(block_type) else 1
            rows.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{last_row}.{slot}.", "plain"))
    return rows


def vae_block_table(config: dict) -> list[tuple[str, str, str]]:
    """Rows ``(diffusers_prefix, ldm_prefix, kind)`` for an AutoencoderKL; LDM numbers decoder levels in reverse."""
    per_level = int(config["layers_per_block"])
    levels = len(config["block_out_channels"])
    rows = [("quant_conv.", "quant_conv.", "plain"), ("post_quant_conv.", "post_quant_conv.", "plain")]
    for part in ("encoder", "decoder"):
        rows += [
            (f"{part}.conv_in.", f"{part}.conv_in.", "plain"),
            (f"{part}.conv_norm_out.", f"{part}.norm_out.", "plain"),
            (f"{part}.conv_out.", f"{part}.conv_out.", "plain"),
            (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", "resnet"),
            (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", "attention"),
            (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", "resnet"),
        ]
    for i in range(levels):
        for j in range(per_level):
            rows.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", "resnet"))
        if i < levels - 1:
            rows.append(
                (f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", "plain")
            )
        ldm_level = levels - 1 - i
        for j in range(per_level + 1):
            rows.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{ldm_level}.block.{j}.", "resnet"))
        if i < levels - 1:
            rows.append(
                (f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{ldm_level}.upsample.conv.", "plain")
            )
    return rows


def _rename(rest: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        if rest.startswith(old):
            return new + rest[len(old) :]
    return rest


def _pairs_from_table(
    component: str,
    rows: list[tuple[str, str, str]],
    shapes: dict[str, Shape],
    inner: dict[str, tuple[tuple[str, str], ...]],
    as_conv: callable,
) -> list[KeyPair]:
    """Map every diffusers key through the longest matching table row; keys no row covers are an error."""
    rows = sorted(rows, key=lambda row: len(row[0]), reverse=True)
    pairs, uncovered = [], []
    for key, shape in shapes.items():
        row = next((r for r in rows if key.startswith(r[0])), None)
        if row is None:
            uncovered.append(key)
            continue
        prefix, ldm_prefix, kind = row
        rest = _rename(key[len(prefix) :], inner.get(kind, ()))
        ldm_key = ldm_prefix + rest
        ldm_shape = tuple(shape) + (1, 1) if as_conv(kind, rest, shape) else tuple(shape)
        pairs.append(KeyPair(key, ldm_key, tuple(shape), ldm_shape))
    if uncovered:
        raise ConversionError(
            f"the {component} has tensors outside the SD1 layout that no key table covers, "
            f"{format_keys(uncovered)}; only SD1-family models convert"
        )
    _check_one_to_one(component, pairs)
    return pairs


def _check_one_to_one(component: str, pairs: list[KeyPair]) -> None:
    seen: dict[str, str] = {}
    clashes = []
    for pair in pairs:
        if pair.ldm in seen:
            clashes.append(f"{seen[pair.ldm]} and {pair.diffusers} -> {pair.ldm}")
        seen[pair.ldm] = pair.diffusers
    if clashes:
        raise ConversionError(f"{component} key table maps two keys to one: {format_keys(clashes)}")


def unet_key_pairs(config: dict, shapes: dict[str, Shape]) -> list[KeyPair]:
    """Diffusers UNet keys <-> ``model.diffusion_model.*``; linear ``proj_in``/``proj_out`` become 1x1 convs."""

    def as_conv(kind: str, rest: str, shape: Shape) -> bool:
        # SD1 detection in ComfyUI and A1111 needs conv (4-D) proj_in/proj_out.
        return kind == "attention" and rest in ("proj_in.weight", "proj_out.weight") and len(shape) == 2

    return _pairs_from_table("UNet", unet_block_table(config), shapes, {"resnet": UNET_RESNET_RENAMES}, as_conv)


def vae_key_pairs(config: dict, shapes: dict[str, Shape]) -> list[KeyPair]:
    """Diffusers VAE keys <-> ``first_stage_model.*``; the mid attention's linear weights become 1x1 convs."""

    def as_conv(kind: str, rest: str, shape: Shape) -> bool:
        return kind == "attention" and rest.endswith(".weight") and not rest.startswith("norm.") and len(shape) == 2

    inner = {"resnet": VAE_RESNET_RENAMES, "attention": VAE_ATTENTION_RENAMES}
    return _pairs_from_table("VAE", vae_block_table(config), shapes, inner, as_conv)


def text_encoder_key_pairs(config: dict, shapes: dict[str, Shape]) -> list[KeyPair]:
    """CLIP text keys (without ``text_model.``) <-> ``cond_stage_model.transformer.text_model.*``."""
    pairs = [KeyPair(key, "text_model." + key, tuple(shape), tuple(shape)) for key, shape in shapes.items()]
    _check_one_to_one("text encoder", pairs)
    return pairs


KEY_PAIR_FUNCTIONS = {"unet": unet_key_pairs, "vae": vae_key_pairs, "text_encoder": text_encoder_key_pairs}
