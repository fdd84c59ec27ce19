"""FlowLunePipeline on tiny SD1.5 components: the diffusers pipeline tests, loading, and DDIM equivalence."""

import json
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)

from flow_lune.flow import EpsilonToFlowUNet, TeacherSchedule, noise_norm, sigma_from_t
from flow_lune.pipelines import FlowLunePipeline
from flow_lune.pipelines import pipeline_flow_lune as pipeline_module
from flow_lune.schedulers import FlowLuneScheduler

STEPS = 2  # enough to exercise the loop (first, last step) on tiny models
SHIFT = 3.0  # a shift != 1, so that a doubly applied shift would show


def make_pipe(components, shift: float = SHIFT) -> FlowLunePipeline:
    parts = components.as_dict()
    parts["scheduler"] = FlowLuneScheduler(shift=shift)
    pipe = FlowLunePipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_pipe(components, scheduler) -> StableDiffusionPipeline:
    parts = {**components.as_dict(), "scheduler": scheduler}
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def latents_of(pipe, prompt="a cat", **kwargs) -> torch.Tensor:
    kwargs = {"num_inference_steps": STEPS, "generator": gen(0), "output_type": "latent", **kwargs}
    return pipe(prompt, **kwargs).images


class CallCounter:
    """Counts forward calls of modules and records the timesteps the UNet is given."""

    def __init__(self, *modules):
        self.calls = 0
        self.timesteps = []
        self.batch_sizes = []
        self.handles = [m.register_forward_pre_hook(self._hook, with_kwargs=True) for m in modules]

    def _hook(self, module, args, kwargs):
        self.calls += 1
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if timestep is not None:
            self.timesteps.append(torch.as_tensor(timestep).flatten()[0].item())
            self.batch_sizes.append((args[0] if args else kwargs["sample"]).shape[0])

    def remove(self):
        for h in self.handles:
            h.remove()


# --- equivalence with diffusers' StableDiffusionPipeline + DDIM ------------------------------------------


def ddim_equivalence_error(components, num_steps: int, dtype: torch.dtype) -> float:
    """Relative max difference of from_teacher(pipe) on DDIM's sigmas and pipe with DDIM (eta 0)."""
    config = components.scheduler.config
    # clip_sample=False: DDIM's x0 clipping to [-1, 1] has no counterpart in the flow Euler step.
    ddim = DDIMScheduler.from_config(config, set_alpha_to_one=True, clip_sample=False)
    pipe = sd_pipe(components, ddim).to(dtype)
    flow = FlowLunePipeline.from_teacher(pipe)
    flow.set_progress_bar_config(disable=True)

    schedule = TeacherSchedule.from_scheduler_config(config)
    ddim.set_timesteps(num_steps)
    sigmas = sigma_from_t(ddim.timesteps, schedule)  # float64; the flow scheduler appends 0
    z = torch.randn(1, 4, 8, 8, generator=gen(0), dtype=torch.float64)
    prompt = "a cat"
    ref = pipe(prompt, num_inference_steps=num_steps, guidance_scale=3.0, latents=z.to(dtype), output_type="latent")
    out = flow(
        prompt, sigmas=sigmas, guidance_scale=3.0, latents=(noise_norm(sigmas[0]) * z).to(dtype), output_type="latent"
    )
    ref, out = ref.images, out.images
    assert out.dtype == ref.dtype == dtype
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize(
    "num_steps,dtype",
    # float32 at 10 steps is roundoff-limited on the tiny random UNet: 5e-5 to 3e-4 with the thread count.
    [(2, torch.float64), (3, torch.float64), (10, torch.float64), (2, torch.float32), (3, torch.float32)],
)
def test_from_teacher_reproduces_ddim_pipeline(tiny_components, num_steps, dtype):
    """DDIM is Euler in sigma with the bridge velocity (DESIGN.md section 2), through both whole pipelines.

    The UNet gets the given sigmas' timesteps in float64, so the wrapped teacher is queried at DDIM's integer
    timesteps exactly; with float32 timesteps (t = 501.0000264 for 501) the tiny random UNet, whose timestep
    embedding reacts to one ulp, moved the result by 5e-4 at 2 steps. diffusers' float32 abar table is kept:
    its difference to the bridge's float64 table (5e-7) stays inside the tolerance.
    """
    assert ddim_equivalence_error(tiny_components, num_steps, dtype) < 1e-4


def test_explicit_sigmas_reach_the_unet_exactly(tiny_components):
    pipe = make_pipe(tiny_components)
    counter = CallCounter(pipe.unet)
    sigmas = torch.tensor([0.93, 0.5010123456789, 0.2], dtype=torch.float64)
    latents_of(pipe, sigmas=sigmas, num_inference_steps=None)
    assert counter.timesteps == [1000 * s for s in sigmas.tolist()]  # float64, not rounded to float32


def test_from_teacher_wraps_without_copies(tiny_components):
    pipe = sd_pipe(tiny_components, tiny_components.scheduler)
    flow = FlowLunePipeline.from_teacher(pipe, shift=SHIFT)
    assert isinstance(flow.unet, EpsilonToFlowUNet) and flow.unet.unet is pipe.unet
    assert flow.vae is pipe.vae and flow.text_encoder is pipe.text_encoder and flow.tokenizer is pipe.tokenizer
    assert isinstance(flow.scheduler, FlowLuneScheduler) and flow.scheduler.config.shift == SHIFT
    with pytest.raises(TypeError, match="already an EpsilonToFlowUNet"):
        FlowLunePipeline.from_teacher(flow)


# --- the sigma grid the UNet is fed -----------------------------------------------------------------------


def test_unet_is_fed_the_flow_lune_grid(tiny_components):
    pipe = make_pipe(tiny_components, shift=3.0)
    counter = CallCounter(pipe.unet)
    latents_of(pipe, num_inference_steps=4)
    # shift 3 once on 1, 0.75, 0.5, 0.25: 1, 0.9, 0.75, 0.5 (diffusers' FlowMatchEuler gives 1, .858, .602, .009)
    assert counter.timesteps == pytest.approx([1000.0, 900.0, 750.0, 500.0], abs=1e-3)
    assert counter.batch_sizes == [2] * 4  # guidance on: unconditional and conditional in one call

    counter.timesteps.clear()
    latents_of(pipe, sigmas=[0.8, 0.3], guidance_scale=1.0)
    assert counter.timesteps == pytest.approx([800.0, 300.0], abs=1e-3)  # given sigmas: no shift
    assert counter.batch_sizes[-2:] == [1, 1]  # guidance 1: no unconditional branch


# --- outputs ----------------------------------------------------------------------------------------------


def test_output_types_and_shapes(tiny_components):
    pipe = make_pipe(tiny_components)
    common = {"num_inference_steps": STEPS, "height": 64, "width": 64}
    pil = pipe("a cat", generator=gen(0), **common).images
    assert isinstance(pil, list) and len(pil) == 1 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (64, 64)
    arr = pipe("a cat", generator=gen(0), output_type="np", **common).images
    assert isinstance(arr, np.ndarray) and arr.shape == (1, 64, 64, 3) and 0 <= arr.min() and arr.max() <= 1
    pt = pipe("a cat", generator=gen(0), output_type="pt", **common).images
    assert isinstance(pt, torch.Tensor) and pt.shape == (1, 3, 64, 64)
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    lat = pipe("a cat", generator=gen(0), output_type="latent", **common).images
    assert lat.shape == (1, 4, 8, 8)
    # Decoding divides by the VAE scaling factor.
    decoded = pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), pt, atol=1e-6, rtol=0)
    images, *rest = pipe("a cat", generator=gen(0), output_type="np", return_dict=False, **common)
    assert rest == [] and np.array_equal(images, arr)
    assert pipe("a cat", num_inference_steps=1, height=128, width=64, output_type="latent").images.shape == (
        1,
        4,
        16,
        8,
    )


def test_batch_and_num_images_per_prompt(tiny_components):
    pipe = make_pipe(tiny_components)
    kwargs = {"guidance_scale": 3.0}  # guidance on: the unconditional half must line up with its image
    out = latents_of(pipe, ["a cat", "a dog"], num_images_per_prompt=2, generator=[gen(i) for i in range(4)], **kwargs)
    assert out.shape == (4, 4, 8, 8)
    # Each image equals the image made alone with its own generator and prompt (batch order: prompt-major).
    for i, prompt in [(1, "a cat"), (2, "a dog")]:  # second image of the first prompt, first of the second
        single = latents_of(pipe, prompt, generator=gen(i), **kwargs)
        # Batched kernels round differently; measured 6e-5 on values of about 4. A mix-up would be O(1).
        torch.testing.assert_close(out[i : i + 1], single, atol=1e-3, rtol=0)
    assert not torch.allclose(out[0], out[1])  # different noise for the two images of one prompt


def test_determinism_with_generator(tiny_components):
    pipe = make_pipe(tiny_components)
    a = latents_of(pipe, generator=gen(7))
    b = latents_of(pipe, generator=gen(7))
    c = latents_of(pipe, generator=gen(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_prompt_embeds_equal_prompt(tiny_components):
    pipe = make_pipe(tiny_components)
    ref = latents_of(pipe, "a cat", negative_prompt="blurry")
    embeds, negative = pipe.encode_prompt("a cat", torch.device("cpu"), 1, True, negative_prompt="blurry")
    out = latents_of(pipe, None, prompt_embeds=embeds, negative_prompt_embeds=negative)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    out = latents_of(pipe, None, prompt_embeds=embeds, negative_prompt=None)  # negative from the empty prompt
    assert not torch.allclose(out, ref)


def test_clip_skip_takes_an_earlier_layer(tiny_components):
    pipe = make_pipe(tiny_components)
    skip1, _ = pipe.encode_prompt("a cat", torch.device("cpu"), 1, False, clip_skip=1)
    ids = pipe.tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states
    final_layer_norm = getattr(pipe.text_encoder, "text_model", pipe.text_encoder).final_layer_norm
    torch.testing.assert_close(skip1, final_layer_norm(hidden[-2]))
    assert not torch.allclose(latents_of(pipe, clip_skip=1), latents_of(pipe))


def test_callback_sees_and_modifies_latents(tiny_components):
    pipe = make_pipe(tiny_components)
    seen = []

    def callback(p, i, t, kwargs):
        seen.append((i, float(t), set(kwargs)))
        assert p is pipe and kwargs["prompt_embeds"].shape == (1, 77, 32)
        if i == STEPS - 1:
            return {"latents": torch.zeros_like(kwargs["latents"])}
        return {}

    out = latents_of(
        pipe, callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"]
    )
    assert torch.equal(out, torch.zeros_like(out))
    assert [s[0] for s in seen] == list(range(STEPS)) and seen[0][2] == {"latents", "prompt_embeds"}
    assert seen[0][1] == pytest.approx(1000.0)

    def halve_first(p, i, t, kwargs):  # a change at step 0 propagates to the result
        return {"latents": kwargs["latents"] * 0.5} if i == 0 else {}

    assert not torch.allclose(latents_of(pipe, callback_on_step_end=halve_first), latents_of(pipe))


# --- bad input: ValueError before any model runs ------------------------------------------------------------

BAD_INPUTS = {
    "prompt and prompt_embeds": ({"prompt": "a", "prompt_embeds": torch.zeros(1, 77, 32)}, ValueError, "not both"),
    "neither prompt": ({"prompt": None}, ValueError, "got neither"),
    "height not /8": ({"height": 60}, ValueError, "divisible by 8"),
    "width not /8": ({"width": 68}, ValueError, "divisible by 8"),
    "generator list length": ({"generator": [gen(0), gen(1)]}, ValueError, "2 generators for 1 images"),
    "output_type": ({"output_type": "jpg"}, ValueError, "output_type"),
    "latents shape": ({"latents": torch.zeros(1, 4, 4, 4)}, ValueError, "latents has shape"),
    "callback input": ({"callback_on_step_end_tensor_inputs": ["noise"]}, ValueError, "noise"),
    "increasing sigmas": ({"sigmas": [0.3, 0.8]}, ValueError, "decreasing"),
    "sigmas and steps": ({"sigmas": [0.8, 0.3], "num_inference_steps": 3}, ValueError, "num_inference_steps"),
    "negative list length": ({"negative_prompt": ["a", "b"]}, ValueError, "negative prompts"),
    "num_images_per_prompt": ({"num_images_per_prompt": 0}, ValueError, "num_images_per_prompt"),
    "prompt type": ({"prompt": 3}, TypeError, "prompt must be"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_before_any_model_runs(tiny_components, case):
    pipe = make_pipe(tiny_components)
    kwargs, error, match = BAD_INPUTS[case]
    counter = CallCounter(pipe.unet, pipe.vae, pipe.text_encoder)
    with pytest.raises(error, match=match):
        pipe(**{"prompt": "a cat", "num_inference_steps": STEPS, **kwargs})
    assert counter.calls == 0


def test_non_flow_scheduler_is_refused(tiny_components):
    with pytest.raises(TypeError, match="from_teacher"):
        FlowLunePipeline(**tiny_components.as_dict())  # PNDM: an epsilon scheduler
    pipe = make_pipe(tiny_components)
    pipe.scheduler = PNDMScheduler.from_config(tiny_components.scheduler.config)
    with pytest.raises(TypeError, match="FlowLuneScheduler.from_config"):
        latents_of(pipe)


# --- saving and loading -------------------------------------------------------------------------------------


def assert_same_weights(a: FlowLunePipeline, b: FlowLunePipeline) -> None:
    for name in ("unet", "vae", "text_encoder"):
        sd_a, sd_b = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sd_a.keys() == sd_b.keys(), name
        assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a), name


def test_save_load_round_trip(tiny_components, tmp_path):
    pipe = make_pipe(tiny_components)
    ref = pipe("a cat", num_inference_steps=STEPS, generator=gen(0), output_type="np").images
    pipe.save_pretrained(tmp_path / "student")
    index = json.loads((tmp_path / "student" / "model_index.json").read_text())
    assert index["_class_name"] == "FlowLunePipeline"
    assert index["scheduler"][1] == "FlowLuneScheduler" and index["scheduler"][0].startswith("flow_lune.")
    sched_config = json.loads((tmp_path / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert sched_config["_class_name"] == "FlowLuneScheduler" and sched_config["shift"] == SHIFT

    loaded = FlowLunePipeline.from_pretrained(tmp_path / "student")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is FlowLuneScheduler and loaded.scheduler.config.shift == SHIFT
    assert_same_weights(pipe, loaded)
    out = loaded("a cat", num_inference_steps=STEPS, generator=gen(0), output_type="np").images
    # Loaded weights live in memory-mapped files at other alignments than freshly built ones, and
    # single-threaded CPU kernels then sum in another order; the tiny random UNet amplifies that
    # rounding to about 1e-3. A second round trip has the same file layout: bit-identical output.
    np.testing.assert_allclose(out, ref, rtol=0, atol=5e-3)
    loaded.save_pretrained(tmp_path / "again")
    again = FlowLunePipeline.from_pretrained(tmp_path / "again")
    again.set_progress_bar_config(disable=True)
    out_again = again("a cat", num_inference_steps=STEPS, generator=gen(0), output_type="np").images
    np.testing.assert_array_equal(out_again, out)


def test_flow_match_euler_folder_loads_with_the_shift_applied_once(tiny_components, tmp_path):
    folder = tmp_path / "diffusers-scheduler"
    make_pipe(tiny_components).save_pretrained(folder)
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index))

    pipe = FlowLunePipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is FlowLuneScheduler and pipe.scheduler.config.shift == 3.0
    counter = CallCounter(pipe.unet)
    latents_of(pipe, num_inference_steps=4)
    assert counter.timesteps == pytest.approx([1000.0, 900.0, 750.0, 500.0], abs=1e-3)

    # A FlowMatchEuler option FlowLuneScheduler does not implement is refused, not ignored.
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_karras_sigmas=True).save_pretrained(folder / "scheduler")
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowLunePipeline.from_pretrained(folder)


def test_diffusion_pipeline_reaches_it_through_custom_pipeline(tiny_components, tmp_path, monkeypatch):
    import diffusers.utils.dynamic_modules_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "modules"))  # not the user's cache
    monkeypatch.setattr(sys, "path", list(sys.path))
    make_pipe(tiny_components).save_pretrained(tmp_path / "student")
    ref = latents_of(FlowLunePipeline.from_pretrained(tmp_path / "student"))  # same files, same alignment
    loaded = DiffusionPipeline.from_pretrained(
        tmp_path / "student", custom_pipeline=pipeline_module.__file__, trust_remote_code=True
    )
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "FlowLunePipeline" and isinstance(loaded.scheduler, FlowLuneScheduler)
    torch.testing.assert_close(latents_of(loaded), ref, atol=0, rtol=0)


# --- loaders ------------------------------------------------------------------------------------------------


def test_lora_changes_output_and_unloading_restores_it(tiny_components, tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from flow_lune.tiny import tiny_sd_components

    pipe = make_pipe(tiny_components)
    base = latents_of(pipe)
    torch.manual_seed(0)
    # init_lora_weights=False: random B as well as A, so the adapter is not a no-op.
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    pipe.unet.add_adapter(config)
    with_adapter = latents_of(pipe)
    FlowLunePipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))

    fresh = make_pipe(tiny_sd_components(seed=0))  # same weights, tokenizer built in memory
    assert torch.equal(latents_of(fresh), base)
    fresh.load_lora_weights(tmp_path / "lora")
    loaded = latents_of(fresh)
    assert not torch.allclose(loaded, base, atol=1e-4)
    torch.testing.assert_close(loaded, with_adapter, atol=1e-5, rtol=1e-5)
    fresh.unload_lora_weights()
    torch.testing.assert_close(latents_of(fresh), base, atol=1e-6, rtol=0)


def test_textual_inversion_token_is_used(tiny_components):
    pipe = make_pipe(tiny_components)
    before = latents_of(pipe, "a <lune> cat")
    embedding = torch.randn(32, generator=gen(3))
    pipe.load_textual_inversion({"<lune>": embedding})
    token_id = pipe.tokenizer.convert_tokens_to_ids("<lune>")
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[token_id], embedding)
    assert not torch.allclose(latents_of(pipe, "a <lune> cat"), before)


def test_from_single_file_of_the_converter(tiny_components, tmp_path):
    """The converter's original-layout file loads back with a local config folder, offline, to the same output."""
    from flow_lune.convert import convert_to_single_file

    pipe = make_pipe(tiny_components)
    ref = latents_of(pipe)
    pipe.save_pretrained(tmp_path / "student")
    single = tmp_path / "student.safetensors"
    convert_to_single_file(tmp_path / "student", single, write_workflow=False, source_hash=False, progress=False)
    loaded = FlowLunePipeline.from_single_file(str(single), config=str(tmp_path / "student"), local_files_only=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is FlowLuneScheduler and loaded.scheduler.config.shift == SHIFT
    torch.testing.assert_close(latents_of(loaded), ref, atol=0, rtol=0)
