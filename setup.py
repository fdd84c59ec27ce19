"""Flow Lune: distil an epsilon-prediction SD1.5 teacher into a rectified-flow student.

The repository keeps the user's top-level layout (``schedulers/``, ``pipelines/``,
``convert/``, ``training/``), but installs every folder under the single ``flow_lune``
namespace so that no generic top-level name (``convert``, ``pipelines``) lands in
site-packages.
"""

from setuptools import setup

# Top-level folders of the repository and the subpackage of flow_lune each one becomes.
SUBPACKAGES = {
    "flow_lune.schedulers": "schedulers",
    "flow_lune.pipelines": "pipelines",
    "flow_lune.convert": "convert",
    "flow_lune.training": "training",
}

setup(
    name="flow-lune",
    version="0.1.0",
    description="Distil an epsilon-prediction Stable Diffusion 1.5 teacher into a rectified-flow student.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["flow_lune", "flow_lune.toy", "flow_lune.evaluation", *SUBPACKAGES],
    package_dir={"flow_lune": "flow_lune", **SUBPACKAGES},
    package_data={
        "flow_lune": ["data/*.json", "data/*.txt"],
        "flow_lune.convert": ["configs/*/*.json"],
        # the shipped toy teacher (StableDiffusionPipeline folder), judge and manifest
        "flow_lune.toy": [
            "assets/*.json",
            "assets/*/*.json",
            "assets/*/*/*.json",
            "assets/*/*.safetensors",
            "assets/*/*/*.safetensors",
        ],
    },
    install_requires=[
        "torch>=2.4",  # torch.nn.attention SDPA, fused AdamW on CPU
        "accelerate>=1.0",  # save_state/load_state hooks, skip_first_batches
        "diffusers>=0.32",  # FlowMatchEulerDiscreteScheduler(sigmas=...), training_utils.EMAModel
        "transformers>=5.0",  # CLIPTokenizer(vocab=dict, merges=list): the in-memory tiny tokenizer
        "datasets>=3.0",  # imagefolder with metadata.jsonl, Dataset.from_generator caching
        "safetensors>=0.4",  # safe_open streaming, metadata in the header
        "peft>=0.13",  # LoRA on UNet2DConditionModel via add_adapter
        "bitsandbytes>=0.45",  # AdamW8bit with CPU tensors
        "tqdm>=4.66",
        "tensorboard>=2.15",
        "pillow>=10",
        "numpy>=1.26",
        "torchmetrics>=1.4",  # evaluation: FrechetInceptionDistance(feature=<module>), CLIPScore
        "matplotlib>=3.7",  # evaluation: the quality-against-steps chart (Agg backend)
    ],
    extras_require={
        "test": ["pytest>=8", "ruff>=0.6", "scipy>=1.10"],  # scipy: an independent Frechet distance in a test
        "inception-fid": ["torch-fidelity>=0.3"],  # torchmetrics' Inception network for real-model FID
    },
    entry_points={
        "console_scripts": [
            "flow-lune-convert=flow_lune.convert.__main__:main",
        ]
    },
)
