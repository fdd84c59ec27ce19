"""FlowLunePipeline: text-to-image sampling of a rectified-flow SD1.5 UNet (the Flow Lune student).

The flow convention is the scheduler's (``flow_lune/schedulers/scheduling_flow_lune.py``): the UNet
takes ``x_sigma`` unscaled with timestep ``1000 * sigma`` and returns ``v = eps - x0``; sampling
starts from plain Gaussian noise at sigma = 1 and Euler-steps to sigma = 0. Classifier-free guidance
is taken on velocities. ``FlowLunePipeline.from_teacher`` runs the same loop over an epsilon SD1.5
UNet through the exact teacher bridge, so teacher and student are sampled the same way.

Absolute imports only: ``DiffusionPipeline.from_pretrained(..., custom_pipeline=<this file>)`` copies
this file into diffusers' module cache and imports it from there.
"""

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import FromSingleFileMixin, StableDiffusionLoraLoaderMixin, TextualInversionLoaderMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput, StableDiffusionMixin
from diffusers.utils import USE_PEFT_BACKEND, logging, replace_example_docstring, scale_lora_layers, unscale_lora_layers
from diffusers.utils.torch_utils import randn_tensor
from transformers import CLIPTextModel, CLIPTokenizer

from flow_lune.flow import EpsilonToFlowUNet, flow_timestep, guided_velocity
from flow_lune.pipelines.loading_checks import check_pretrained_path, is_url, missing_folder_message
from flow_lune.schedulers import FlowLuneScheduler

logger = logging.get_logger(__name__)

OUTPUT_TYPES = ("pil", "np", "pt", "latent")

# FlowMatchEulerDiscreteScheduler options that change its sigma grid in ways FlowLuneScheduler does
# not implement, with their no-op values; a config that sets one of them cannot be taken over.
_FLOW_MATCH_UNSUPPORTED = {
    "use_dynamic_shifting": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "stochastic_sampling": False,
}

EXAMPLE_DOC_STRING = """
    Examples:
        ```py
        >>> import torch
        >>> from flow_lune.pipelines import FlowLunePipeline

        >>> pipe = FlowLunePipeline.from_pretrained("path/to/flow-lune-student", torch_dtype=torch.float16)
        >>> pipe = pipe.to("cuda")
        >>> image = pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=8).images[0]

        >>> # The teacher, sampled in flow coordinates on the same sigma grid (trainer validation):
        >>> from diffusers import StableDiffusionPipeline
        >>> teacher = FlowLunePipeline.from_teacher(StableDiffusionPipeline.from_pretrained("path/to/sd15"), shift=3.0)
        >>> image = teacher("a photo of an astronaut riding a horse on mars", num_inference_steps=8).images[0]
        ```
"""


def as_flow_lune_scheduler(scheduler: Any) -> FlowLuneScheduler:
    """The pipeline's scheduler: a ``FlowLuneScheduler`` as is, or one built from a ``FlowMatchEulerDiscreteScheduler``.

    diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps`` shifts an already shifted grid a second
    time (DESIGN.md section 1), so a folder saved with it would be sampled on the wrong sigmas. Its config
    (``num_train_timesteps``, ``shift``) is taken over by ``FlowLuneScheduler``, which shifts once; a config
    using an option FlowLuneScheduler does not implement raises ``ValueError``. Anything else raises ``TypeError``.
    """
    if isinstance(scheduler, FlowLuneScheduler):
        return scheduler
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        unsupported = {
            k: scheduler.config.get(k) for k, off in _FLOW_MATCH_UNSUPPORTED.items() if scheduler.config.get(k) != off
        }
        if unsupported:
            raise ValueError(
                f"The FlowMatchEulerDiscreteScheduler config sets {unsupported}, which FlowLuneScheduler does not "
                f"implement; set them to { ({k: _FLOW_MATCH_UNSUPPORTED[k] for k in unsupported}) } in "
                "scheduler/scheduler_config.json, or pass scheduler=FlowLuneScheduler(shift=...)."
            )
        logger.warning(
            "FlowLunePipeline samples with FlowLuneScheduler; taking over the FlowMatchEulerDiscreteScheduler config "
            f"(shift={scheduler.config.shift}) so that the shift is applied once, not twice as diffusers' "
            "set_timesteps does. save_pretrained will write FlowLuneScheduler."
        )
        return FlowLuneScheduler.from_config(scheduler.config)
    raise TypeError(
        f"FlowLunePipeline needs a flow scheduler (FlowLuneScheduler or FlowMatchEulerDiscreteScheduler), got "
        f"{type(scheduler).__name__}. For an epsilon-prediction SD1.5 pipeline use "
        "FlowLunePipeline.from_teacher(pipe); for a Flow Lune student folder pass "
        "scheduler=FlowLuneScheduler(shift=...)."
    )


def encode_text(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    texts: list[str],
    device: str | torch.device,
    clip_skip: int | None = None,
) -> torch.Tensor:
    """CLIP hidden states of ``texts``, padded to the tokenizer's length (as SD1.5 was trained), in the encoder's dtype.

    The pipeline's prompts and the trainer's cached embeddings both come from here. ``clip_skip``: layers skipped
    from the end; 1 takes the penultimate layer's states, passed through the final layer norm as the last layer's are.
    """
    max_length = tokenizer.model_max_length
    input_ids = tokenizer(
        texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    too_long = [t for t, n in zip(texts, tokenizer(texts).input_ids) if len(n) > max_length]
    if too_long:
        logger.warning(f"CLIP takes at most {max_length} tokens; these prompts were truncated: {too_long}")
    if clip_skip is None:
        return text_encoder(input_ids.to(device))[0]
    hidden_states = text_encoder(input_ids.to(device), output_hidden_states=True).hidden_states
    # The last layer's states pass through the final layer norm; so must the earlier layer's.
    # transformers 5 flattens CLIPTextModel (no .text_model); 4.x nests it.
    final_layer_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
    return final_layer_norm(hidden_states[-(clip_skip + 1)])


class FlowLunePipeline(
    DiffusionPipeline,
    StableDiffusionMixin,
    TextualInversionLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    FromSingleFileMixin,
):
    r"""Text-to-image sampling of a rectified-flow Stable Diffusion 1.5 UNet (velocity ``v = eps - x0``).

    Loading:
        - ``FlowLunePipeline.from_pretrained(folder)``: ``model_index.json`` names ``FlowLunePipeline``, the
          scheduler ``["flow_lune.schedulers.scheduling_flow_lune", "FlowLuneScheduler"]`` (diffusers records a
          class outside its own libraries under its module path and finds it in ``sys.modules``, which importing
          this pipeline fills). A folder whose scheduler is diffusers' ``FlowMatchEulerDiscreteScheduler`` loads
          too: its config is taken over by ``FlowLuneScheduler`` (see ``as_flow_lune_scheduler``).
        - ``DiffusionPipeline.from_pretrained(folder, custom_pipeline=flow_lune.pipelines.pipeline_flow_lune.__file__,
          trust_remote_code=True)``: diffusers copies this file into its module cache and imports this class from
          it (a local ``.py`` path needs ``trust_remote_code=True``; nothing is downloaded). Without
          ``custom_pipeline`` diffusers looks for ``diffusers.FlowLunePipeline`` and fails.
        - ``FlowLunePipeline.from_single_file(path, config=folder)``: a single-file checkpoint in the original (LDM)
          key layout, with a local pipeline folder for the configs (offline).
        - ``FlowLunePipeline.from_teacher(sd_pipeline, shift=...)``: an epsilon-prediction SD1.5 pipeline sampled in
          flow coordinates through the exact teacher bridge (no weights copied). Load LoRAs into ``sd_pipeline``
          before wrapping it; the wrapped UNet has no LoRA loader and is not saved by ``save_pretrained``.

    Also inherits ``load_lora_weights`` / ``save_lora_weights`` / ``unload_lora_weights`` (peft) and
    ``load_textual_inversion``.

    Args:
        vae: decodes latents divided by ``vae.config.scaling_factor``.
        text_encoder: CLIP text encoder (``CLIPTextModel``).
        tokenizer: its ``CLIPTokenizer``.
        unet: a velocity-prediction ``UNet2DConditionModel`` (or ``EpsilonToFlowUNet`` via ``from_teacher``).
        scheduler: ``FlowLuneScheduler`` (a ``FlowMatchEulerDiscreteScheduler`` is converted, see above).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = []
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        unet: UNet2DConditionModel,
        scheduler: FlowLuneScheduler | FlowMatchEulerDiscreteScheduler,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=as_flow_lune_scheduler(scheduler),
        )
        # SD1.5's VAE downsamples by 2 per block after the first: 8 for four blocks.
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @classmethod
    def from_teacher(cls, sd_pipeline: DiffusionPipeline, shift: float = 1.0) -> "FlowLunePipeline":
        """The epsilon-prediction SD1.5 pipeline ``sd_pipeline`` sampled in flow coordinates.

        Same VAE, text encoder and tokenizer objects; the UNet is wrapped by
        ``EpsilonToFlowUNet(unet, sd_pipeline.scheduler.config)``, which returns the teacher-consistent
        velocity ``v*`` (DESIGN.md section 2). No weights are copied.

        Args:
            sd_pipeline: a pipeline with ``vae``, ``text_encoder``, ``tokenizer``, ``unet`` and the teacher's own
                DDPM-family ``scheduler`` (its betas define the bridge), or any object with these attributes (the
                trainer passes its ``TeacherComponents``).
            shift: the FlowLuneScheduler shift; 1.0 is the scheduler's default, pass the student's training
                shift to sample teacher and student on the same sigma grid.
        """
        needed = ("vae", "text_encoder", "tokenizer", "unet", "scheduler")
        missing = [n for n in needed if getattr(sd_pipeline, n, None) is None]
        if missing:
            raise TypeError(
                f"from_teacher needs a Stable Diffusion 1.5 pipeline with vae, text_encoder, tokenizer, unet and "
                f"scheduler; {type(sd_pipeline).__name__} lacks {missing}."
            )
        if isinstance(sd_pipeline.unet, EpsilonToFlowUNet):
            raise TypeError("sd_pipeline.unet is already an EpsilonToFlowUNet; pass the epsilon teacher's pipeline.")
        scheduler = FlowLuneScheduler(shift=shift)
        unet = EpsilonToFlowUNet(
            sd_pipeline.unet, sd_pipeline.scheduler.config, flow_timesteps=scheduler.config.num_train_timesteps
        )
        return cls(
            vae=sd_pipeline.vae,
            text_encoder=sd_pipeline.text_encoder,
            tokenizer=sd_pipeline.tokenizer,
            unet=unet,
            scheduler=scheduler,
        )

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        lora_scale: float | None = None,
        clip_skip: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLIP embeddings of the prompts (and of the negative prompts when guiding), repeated per image.

        Args:
            clip_skip: layers skipped from the end of CLIP; 1 takes the penultimate layer's hidden states,
                passed through the final layer norm as the last layer's are.
            lora_scale: scale of the text encoder's LoRA layers, if any.

        Returns:
            ``(prompt_embeds, negative_prompt_embeds)``, each ``(batch * num_images_per_prompt, 77, dim)``;
            the second is ``None`` without guidance.
        """
        if lora_scale is not None and USE_PEFT_BACKEND and self.text_encoder is not None:
            self._lora_scale = lora_scale
            scale_lora_layers(self.text_encoder, lora_scale)

        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds = self._encode_text(prompt, device, clip_skip)
        batch_size = prompt_embeds.shape[0]
        dtype = self.text_encoder.dtype if self.text_encoder is not None else self.unet.dtype
        prompt_embeds = prompt_embeds.to(dtype=dtype, device=device).repeat_interleave(num_images_per_prompt, dim=0)

        if do_classifier_free_guidance:
            if negative_prompt_embeds is None:
                if negative_prompt is None:
                    negative_prompt = [""] * batch_size
                elif isinstance(negative_prompt, str):
                    negative_prompt = [negative_prompt] * batch_size
                negative_prompt_embeds = self._encode_text(negative_prompt, device, clip_skip=None)
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=dtype, device=device)
            negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        else:
            negative_prompt_embeds = None

        if lora_scale is not None and USE_PEFT_BACKEND and self.text_encoder is not None:
            unscale_lora_layers(self.text_encoder, lora_scale)
        return prompt_embeds, negative_prompt_embeds

    def _encode_text(self, texts: list[str], device: torch.device, clip_skip: int | None) -> torch.Tensor:
        """CLIP hidden states of ``texts`` (textual-inversion tokens expanded first); see ``encode_text``."""
        texts = self.maybe_convert_prompt(texts, self.tokenizer)  # textual inversion multi-vector tokens
        return encode_text(self.tokenizer, self.text_encoder, texts, device, clip_skip)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "FlowLunePipeline":
        """diffusers' ``from_pretrained``, after a plain check of a local path (see ``loading_checks``).

        A path that can only be local and does not exist, a file, or a folder without ``model_index.json`` raises
        ``ValueError`` naming the path and the fix, instead of diffusers' "neither a valid local path nor a valid
        repo id". A name that could be a Hub repo id is tried there; if that fails too, the message says both.
        """
        local = check_pretrained_path(pretrained_model_name_or_path)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except OSError as err:
            if local is not None:
                raise
            raise OSError(
                f"{missing_folder_message(pretrained_model_name_or_path)}. As a Hub repo id it failed too: {err}"
            ) from err

    @classmethod
    def from_single_file(cls, pretrained_model_link_or_path: str | os.PathLike, **kwargs) -> "FlowLunePipeline":
        """diffusers' ``from_single_file``, after the converter's own checks of a local file.

        ``flow_lune.convert.single_file_checks.check_flow_single_file`` reads the header first: a missing path,
        a folder, a pickle, a truncated file, an SDXL/SD2/other file, a UNet-only file and an epsilon (or
        unlabelled) SD1.5 file each raise one ``ValueError`` naming the file and the fix, before diffusers reads
        anything. The scheduler is ``FlowLuneScheduler`` with the shift in the file's header (``flow_lune.shift``)
        unless ``scheduler`` is passed; passing one also lets a flow file without the Flow Lune header load.
        """
        if not is_url(pretrained_model_link_or_path):
            from flow_lune.convert.single_file_checks import check_flow_single_file

            facts = check_flow_single_file(pretrained_model_link_or_path, declared_flow="scheduler" in kwargs)
            if facts.shift is not None and "scheduler" not in kwargs:
                kwargs["scheduler"] = FlowLuneScheduler(shift=facts.shift)
            pretrained_model_link_or_path = str(facts.path)
        return super().from_single_file(pretrained_model_link_or_path, **kwargs)

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        height: int,
        width: int,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        clip_skip: int | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
    ) -> None:
        """Raise ``ValueError``/``TypeError`` for bad arguments before any model runs."""
        if not isinstance(self.scheduler, FlowLuneScheduler):
            raise TypeError(
                f"pipe.scheduler is a {type(self.scheduler).__name__}; FlowLunePipeline steps with FlowLuneScheduler. "
                "Set pipe.scheduler = FlowLuneScheduler.from_config(pipe.scheduler.config)."
            )
        if height % self.vae_scale_factor != 0 or width % self.vae_scale_factor != 0:
            raise ValueError(
                f"height and width must be divisible by {self.vae_scale_factor} (the VAE's factor), got {height} and "
                f"{width}; round them to a multiple of {self.vae_scale_factor}."
            )
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either prompt or prompt_embeds, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass prompt (a string or a list of strings) or prompt_embeds; got neither.")
        if prompt is not None and not (
            isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))
        ):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either negative_prompt or negative_prompt_embeds, not both.")
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if batch_size == 0:
            raise ValueError("prompt is an empty list; pass at least one prompt.")
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch_size:
            raise ValueError(
                f"{len(negative_prompt)} negative prompts for {batch_size} prompts; "
                "pass one per prompt or a single string."
            )
        if negative_prompt is not None and not isinstance(negative_prompt, (str, list)):
            raise TypeError(
                f"negative_prompt must be a string or a list of strings, got {type(negative_prompt).__name__}."
            )
        if prompt_embeds is not None and prompt_embeds.ndim != 3:
            raise ValueError(f"prompt_embeds must be (batch, tokens, dim), got shape {tuple(prompt_embeds.shape)}.")
        if negative_prompt_embeds is not None and negative_prompt_embeds.ndim != 3:
            raise ValueError(
                f"negative_prompt_embeds must be (batch, tokens, dim), got shape {tuple(negative_prompt_embeds.shape)}."
            )
        for name, embeds in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if embeds is not None:
                self._check_embedding_width(name, embeds)
        if negative_prompt_embeds is not None and prompt_embeds is not None:
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(
                    f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)} but prompt_embeds has "
                    f"{tuple(prompt_embeds.shape)}; they must match."
                )
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape[0] != batch_size:
            raise ValueError(
                f"negative_prompt_embeds has batch {negative_prompt_embeds.shape[0]} for {batch_size} prompts; "
                "they must match."
            )
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}.")
        total = batch_size * num_images_per_prompt
        if isinstance(generator, list) and len(generator) != total:
            raise ValueError(
                f"{len(generator)} generators for {total} images ({batch_size} prompts x {num_images_per_prompt} "
                "per prompt); pass one generator, or a list with one per image."
            )
        if latents is not None:
            factor = self.vae_scale_factor
            shape = (total, self.unet.config.in_channels, height // factor, width // factor)
            if tuple(latents.shape) != shape:
                raise ValueError(
                    f"latents has shape {tuple(latents.shape)}, expected {shape} "
                    f"for {total} images of {height}x{width}."
                )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        if clip_skip is not None and (not isinstance(clip_skip, int) or clip_skip < 0):
            raise ValueError(f"clip_skip must be a non-negative integer or None, got {clip_skip!r}.")
        unknown = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs has {unknown}; "
                f"the callback can receive {self._callback_tensor_inputs}."
            )

    def _check_embedding_width(self, name: str, embeds: torch.Tensor) -> None:
        """``ValueError`` when ``embeds``' last dimension is not the UNet's cross-attention width (nor the text
        encoder's hidden size): embeddings from another model (e.g. SDXL's 2048 or SD2's 1024 for SD1.5's 768)."""
        width = embeds.shape[-1]
        expected = self.unet.config.cross_attention_dim
        widths = set(expected) if isinstance(expected, (list, tuple)) else {expected}
        encoder = self.text_encoder.config.hidden_size if self.text_encoder is not None else None
        if width not in widths or (encoder is not None and width != encoder):
            raise ValueError(
                f"{name} has width {width} (its last dimension), but this pipeline's UNet takes cross-attention "
                f"width {expected} and its text encoder gives {encoder}: the embeddings come from another text "
                f"encoder. Make them with this pipeline's (pipe.encode_prompt), or pass prompt strings."
            )

    def prepare_latents(
        self,
        batch_size: int,
        num_channels_latents: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The state at the first sigma: plain unit Gaussian noise (sigma = 1 needs no scaling), or ``latents``."""
        if latents is not None:
            return latents.to(device=device, dtype=dtype)
        shape = (batch_size, num_channels_latents, height // self.vae_scale_factor, width // self.vae_scale_factor)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)

    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Guidance w = 1 is the conditional velocity alone: skip the unconditional half."""
        return self._guidance_scale > 1

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    @torch.no_grad()
    @replace_example_docstring(EXAMPLE_DOC_STRING)
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict] | PipelineCallback | MultiPipelineCallbacks | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images from text.

        Args:
            prompt: the prompt(s); or pass ``prompt_embeds``.
            height, width: image size in pixels, multiples of 8; default ``unet.config.sample_size * 8``.
            num_inference_steps: Euler steps on the scheduler's shifted grid; default 28 (diffusers' flow-matching
                default) when ``sigmas`` is not given.
            sigmas: explicit decreasing sigmas in (0, 1], used as given (no shift); 0 is appended. Replaces the grid.
            guidance_scale: classifier-free guidance ``v_u + w (v_c - v_u)`` on velocities; 1 disables it.
                Default 7.5, SD1.5's, since the student is distilled with the teacher's conditional and
                unconditional velocities.
            negative_prompt: prompt(s) for the unconditional branch; default the empty prompt.
            num_images_per_prompt: images per prompt.
            generator: a ``torch.Generator``, or a list with one per image, for the initial noise.
            latents: the state at the first sigma, ``(batch * num_images_per_prompt, 4, height / 8, width / 8)``;
                at sigma = 1 that is unit Gaussian noise. Default: drawn with ``generator``.
            prompt_embeds, negative_prompt_embeds: precomputed CLIP embeddings (e.g. for prompt weighting).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the final latents, not decoded).
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            cross_attention_kwargs: passed to the UNet's attention processors (``"scale"`` scales LoRA layers).
            clip_skip: CLIP layers skipped from the end for the prompt embeddings.
            callback_on_step_end: called as ``callback(pipe, i, t, callback_kwargs)`` after each step; the tensors it
                returns (``latents``, ``prompt_embeds``, ``negative_prompt_embeds``) replace the pipeline's.
            callback_on_step_end_tensor_inputs: the tensors passed in ``callback_kwargs``.

        Examples:

        Returns:
            ``ImagePipelineOutput`` with ``images``, or the tuple ``(images,)``.
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs

        # 0. Default height and width to the UNet's sample size
        sample_size = self.unet.config.sample_size
        sample_h, sample_w = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        height = height or sample_h * self.vae_scale_factor
        width = width or sample_w * self.vae_scale_factor

        # 1. Check inputs; raise before any model runs
        self.check_inputs(
            prompt,
            height,
            width,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            num_images_per_prompt,
            generator,
            latents,
            output_type,
            clip_skip,
            callback_on_step_end_tensor_inputs,
        )
        self._guidance_scale = guidance_scale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        # 2. Define call parameters
        if isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None:
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        device = self._execution_device

        # 3. Prepare timesteps (the scheduler validates sigmas, still before any model runs)
        if sigmas is None and num_inference_steps is None:
            num_inference_steps = 28
        self.scheduler.set_timesteps(num_inference_steps=num_inference_steps, device=device, sigmas=sigmas)
        num_inference_steps = self.scheduler.num_inference_steps
        self._num_timesteps = num_inference_steps

        # 4. Encode input prompt
        lora_scale = cross_attention_kwargs.get("scale") if cross_attention_kwargs is not None else None
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt,
            device,
            num_images_per_prompt,
            self.do_classifier_free_guidance,
            negative_prompt,
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale,
            clip_skip=clip_skip,
        )
        # One UNet call per step for both branches: unconditional first, as diffusers orders them.
        model_embeds = (
            torch.cat([negative_prompt_embeds, prompt_embeds]) if self.do_classifier_free_guidance else prompt_embeds
        )

        # 5. Prepare latent variables: the state at the first sigma
        latents = self.prepare_latents(
            batch_size * num_images_per_prompt,
            self.unet.config.in_channels,
            height,
            width,
            prompt_embeds.dtype,
            device,
            generator,
            latents,
        )

        # 6. Denoising loop: Euler in sigma with the (guided) velocity
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, sigma in enumerate(self.scheduler.sigmas[:-1]):
                if self.interrupt:
                    continue
                # the scheduler's sigmas are float64: a wrapped teacher is queried at exact timesteps
                t = flow_timestep(sigma, self.scheduler.config.num_train_timesteps)
                latent_model_input = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
                v = self.unet(
                    latent_model_input,
                    t.expand(latent_model_input.shape[0]),
                    encoder_hidden_states=model_embeds,
                    cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=False,
                )[0]
                if self.do_classifier_free_guidance:
                    v_uncond, v_cond = v.chunk(2)
                    v = guided_velocity(v_uncond, v_cond, guidance_scale)
                latents = self.scheduler.step(v, t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                    latents = callback_outputs.pop("latents", latents)
                    if "prompt_embeds" in callback_outputs or "negative_prompt_embeds" in callback_outputs:
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                        model_embeds = (
                            torch.cat([negative_prompt_embeds, prompt_embeds])
                            if self.do_classifier_free_guidance
                            else prompt_embeds
                        )
                progress_bar.update()

        # 7. Decode: latents are VAE latents times the scaling factor
        if output_type == "latent":
            image = latents
        else:
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            image = self.vae.decode(latents, return_dict=False, generator=generator)[0]
            image = self.image_processor.postprocess(image, output_type=output_type)

        # Offload all models
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
