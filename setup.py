from setuptools import find_packages, setup

setup(
    name="modelstock-dynopool",
    version="0.1.0",
    description="Model Stock checkpoint merging and DynOPool, with Triton kernels and PyTorch references",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["msdp_kernels", "msdp_kernels.*", "modelstock", "modelstock.*", "dynopool", "dynopool.*"]),
    install_requires=["torch>=2.4", "safetensors", "numpy", "tqdm", "pyyaml"],
    extras_require={
        "triton": ["triton"],
        "clip": ["open_clip_torch"],
        "plot": ["matplotlib"],
        "demo": ["open_clip_torch", "matplotlib", "scikit-learn"],
        "dev": ["pytest", "pytest-benchmark", "open_clip_torch", "matplotlib", "triton", "scikit-learn", "transformers",
                "timm==1.0.31", "onnx==1.23.2", "onnxscript==0.7.2", "onnxruntime==1.32.0", "peft==0.21.2"],
    },
    entry_points={"console_scripts": ["modelstock = modelstock.cli:main"]},
)
