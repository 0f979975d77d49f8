import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
# One version, single-sourced: msdp_kernels/_version.py (read here without importing anything).
VERSION = re.search(r'^__version__ = "([^"]+)"', (HERE / "msdp_kernels" / "_version.py").read_text(), re.M)[1]

# What each extra brings, named after what a user does with it; a missing one is a one-line
# error naming `pip install "modelstock-dynopool[<extra>]"` (modelstock/extras.py).
EXTRAS = {
    "mergekit": ["pyyaml", "transformers", "huggingface_hub"],  # mergekit configs, tokenizer_source, hub ids
    "plot": ["matplotlib"],                                      # --plot, MergeReport.plot
    "clip": ["open_clip_torch"],                                 # open_clip-shaped synthetic checkpoints
    "dynopool-export": ["onnx", "onnxscript", "onnxruntime"],    # torch.onnx.export of a frozen model
    "triton": ["triton"],                                        # the CUDA kernels (torch's Linux wheels bring it)
}
EXTRAS["demo"] = ["open_clip_torch", "matplotlib", "scikit-learn"]
EXTRAS["dev"] = sorted({*sum(EXTRAS.values(), []), "pytest", "pytest-benchmark", "safetensors", "peft", "timm"})

setup(
    name="modelstock-dynopool",
    version=VERSION,
    description="Model Stock checkpoint merging and DynOPool, with Triton kernels and PyTorch references",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    python_requires=">=3.10",
    packages=find_packages(include=["msdp_kernels", "msdp_kernels.*", "modelstock", "modelstock.*", "dynopool",
                                    "dynopool.*"]),
    # numpy: the file merge's arithmetic; tqdm: its progress bar; torch: everything in memory.
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["modelstock = modelstock.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Operating System :: POSIX :: Linux",
                 "Topic :: Scientific/Engineering :: Artificial Intelligence"],
)
