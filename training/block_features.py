"""Per-block features of a UNet, captured by forward hooks (DESIGN.md section 5).

The nine blocks are ``down_blocks.0..3``, ``mid_block`` and ``up_blocks.0..3``. A block's feature is
its output (``output[0]`` when the block returns a tuple, as the down blocks do) pooled over H and W:

    f_b = mean_{h, w} output_b[:, :, h, w]      shape (B, C_b)

Hooks sit on the module objects of the *unwrapped* UNet, never on names: under DDP the names gain a
``module.`` prefix, the objects stay the same.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flow_lune.settings import BASE_BLOCK_WEIGHTS  # noqa: F401  (w_b, held in the torch-free settings for the flags)

BLOCK_NAMES: tuple[str, ...] = (
    "down_blocks.0",
    "down_blocks.1",
    "down_blocks.2",
    "down_blocks.3",
    "mid_block",
    "up_blocks.0",
    "up_blocks.1",
    "up_blocks.2",
    "up_blocks.3",
)


def block_output_tensor(out: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """A block's feature map: ``out[0]`` when the block returns a tuple (down blocks), else ``out``."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.ndim != 4:
        raise TypeError(f"A UNet block output must be a (B, C, H, W) tensor, got {type(out).__name__}.")
    return out


def pool_block_output(out: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """Pooled block feature ``f_b = mean_{h, w} out[:, :, h, w]``: (B, C, H, W) -> (B, C)."""
    return block_output_tensor(out).mean(dim=(2, 3))


def block_modules(unet: nn.Module) -> list[nn.Module]:
    """The nine block modules of an SD1.5-layout UNet, in ``BLOCK_NAMES`` order.

    Raises ``ValueError`` naming the missing block when ``unet`` does not have SD1.5's layout.
    """
    modules = []
    for name in BLOCK_NAMES:
        try:
            modules.append(unet.get_submodule(name))
        except AttributeError as err:
            raise ValueError(
                f"The UNet has no block {name!r}; Flow Lune needs an SD1.5-layout UNet2DConditionModel with "
                f"blocks {BLOCK_NAMES}. Pass the unwrapped model (accelerator.unwrap_model(unet))."
            ) from err
    return modules


def block_channels(unet: nn.Module) -> list[int]:
    """Channel count ``C_b`` of each block's output, from the UNet's config (down: c_i, mid: c_-1, up: reversed)."""
    channels = list(unet.config.block_out_channels)
    if len(channels) != 4:
        raise ValueError(f"An SD1.5-layout UNet has 4 block_out_channels, got {channels}.")
    return [*channels, channels[-1], *reversed(channels)]


class BlockFeatureHooks:
    """Forward hooks on the nine blocks of a UNet; a context manager.

    After each forward of the UNet, ``features`` holds nine tensors: pooled (B, C_b) when ``pooled``,
    else the full (B, C_b, H_b, W_b) maps. Gradients flow through them (the student's KD term needs
    them); run the teacher under ``torch.no_grad()``.

    Example::

        with BlockFeatureHooks(accelerator.unwrap_model(unet)) as hooks:
            unet(x, t, c)
            kd = block_kd(hooks.features, teacher_hooks.features)
    """

    def __init__(self, unet: nn.Module, pooled: bool = True):
        self.modules = block_modules(unet)
        self.pooled = pooled
        self._outputs: list[torch.Tensor | None] = [None] * len(self.modules)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, index: int):
        def hook(module: nn.Module, args, output) -> None:
            self._outputs[index] = pool_block_output(output) if self.pooled else block_output_tensor(output)

        return hook

    def attach(self) -> BlockFeatureHooks:
        if not self._handles:
            self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.clear()

    def clear(self) -> None:
        """Forget the captured features (frees the activations they keep alive)."""
        self._outputs = [None] * len(self.modules)

    def __enter__(self) -> BlockFeatureHooks:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def features(self) -> list[torch.Tensor]:
        """The nine captured block features of the last forward, in ``BLOCK_NAMES`` order."""
        missing = [name for name, out in zip(BLOCK_NAMES, self._outputs) if out is None]
        if missing:
            raise RuntimeError(
                f"No features captured for blocks {missing}: attach the hooks (use `with BlockFeatureHooks(...)`) "
                "and run a forward of the hooked UNet first."
            )
        return list(self._outputs)
