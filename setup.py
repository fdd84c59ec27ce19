"""Flow Lune: distil an epsilon-prediction SD1.5 teacher into a rectified-flow student.

The repository keeps the user's top-level layout (``schedulers/``, ``pipelines/``,
``convert/``, ``training/``), but installs every folder under the single ``flow_lune``
namespace so that no generic top-level name (``convert``, ``pipelines``) lands in
site-packages.
"""

from setuptools import find_packages, setup

# Top-level folders of the repository and the package of flow_lune each one becomes.
FOLDERS = {
    "flow_lune": "flow_lune",
    "flow_lune.flow": "flow",
    "flow_lune.schedulers": "schedulers",
    "flow_lune.pipelines": "pipelines",
    "flow_lune.convert": "convert",
    "flow_lune.training": "training",
}
# Every package below each folder, so a nested subpackage ships in the wheel as it imports in an editable install.
PACKAGES = [
    name
    for package, folder in FOLDERS.items()
    for name in (package, *(f"{package}.{sub}" for sub in find_packages(folder)))
]

setup(
    name="flow-lune",
    version="0.1.0",
    description="Distil an epsilon-prediction Stable Diffusion 1.5 teacher into a rectified-flow student.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=FOLDERS,  # a nested package's folder follows from its parent's
    # Data files, recursively: the converter's built-in configs, and assets under any flow_lune subpackage.
    package_data={"flow_lune": ["*/assets/**/*"], "flow_lune.convert": ["configs/**/*.json"]},
    install_requires=[
        "torch>=2.4",  # torch.nn.attention SDPA, fused AdamW on CPU
        "accelerate>=1.0",  # save_state/load_state hooks, skip_first_batches
        "diffusers>=0.32",  # FlowMatchEulerDiscreteScheduler(sigmas=...), training_utils.EMAModel
        "transformers>=5.0",  # CLIPTokenizer(vocab=dict, merges=list): the in-memory tiny tokenizer
        "datasets>=3.0",  # imagefolder with metadata.jsonl, Dataset.from_generator caching
        "safetensors>=0.4",  # safe_open streaming, metadata in the header
        "peft>=0.13",  # LoRA on UNet2DConditionModel via add_adapter
        "bitsandbytes>=0.45",  # AdamW8bit with CPU tensors
        "tqdm>=4.66",  # progress bars of the trainers and cache builds
        "tensorboard>=2.15",  # --report_to tensorboard, the trainer's default
        "pillow>=10",  # image grids, image datasets
        "matplotlib>=3.7",  # every chart (training/plots.py): Axes.set_yticks(labels=...), colormaps registry
        "numpy>=1.26",
        "torchmetrics>=1.4",  # evaluation: FrechetInceptionDistance(feature=<module>), CLIPScore
    ],
    extras_require={
        # wheel: tests/test_packaging.py builds the wheel offline (setuptools < 70.1 has no bdist_wheel of its own)
        # scipy: an independent Frechet distance in a test
        "test": ["pytest>=8", "ruff>=0.6", "wheel>=0.40", "scipy>=1.10"],
        "inception-fid": ["torch-fidelity>=0.3"],  # torchmetrics' Inception network for real-model FID
    },
    entry_points={
        "console_scripts": [
            "flow-lune-convert=flow_lune.convert.__main__:main",
        ]
    },
)
