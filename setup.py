from setuptools import find_packages, setup

setup(
    name="sag",
    version="0.1.0",
    description="Self-Attention Guidance (Hong et al., ICCV 2023) and its siblings for the OpenAI ADM / IDDPM U-Nets, in pure PyTorch",
    packages=find_packages(include=["sag", "sag.*", "unet", "unet.*", "diffusion", "diffusion.*",
                                    "checkpoints_convert", "checkpoints_convert.*"]),
    package_data={"sag": ["assets/*"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=["torch", "numpy", "pillow", "tqdm", "scipy", "safetensors"],
    extras_require={"test": ["pytest"]},
    entry_points={"console_scripts": ["sag-sample=sag.sample:main"]},
)
