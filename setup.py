from setuptools import find_packages, setup

# nnunetv2 and dynamic-network-architectures are installed by scripts/install.sh with --no-deps: their only extra
# dependency, timm, drags in a CUDA torchvision that cannot be imported next to the CPU torch (see README).
# `pip install -e .[nnunet]` pulls them with every dependency instead (GPU machines with a matching torchvision).
setup(
    name="diffnnunet",
    version="0.1.0",
    description="Diffusion-model segmentation as automatic as nnU-Net",
    packages=find_packages(include=["diffnnunet", "diffnnunet.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1.2,!=2.9.*",
        "acvl-utils>=0.2.6,<0.3", "batchgenerators>=0.25.1", "batchgeneratorsv2>=0.3.2", "einops",
        "tqdm", "scipy", "scikit-learn", "scikit-image>=0.19.3", "SimpleITK>=2.2.1", "pandas", "tifffile",
        "requests", "nibabel", "matplotlib", "seaborn", "imagecodecs", "yacs", "blosc2>=3.3.2", "graphviz",
        "numpy>=1.24", "monai>=1.3",
    ],
    extras_require={
        "nnunet": ["nnunetv2==2.8.1", "dynamic-network-architectures>=0.4.4,<0.5"],
        "demo": ["nilearn>=0.10"],
        "test": ["pytest>=7", "pytest-xdist>=3", "ruff"],
    },
    entry_points={"console_scripts": [
        "diffnnunet_plan_and_preprocess=diffnnunet.cli.plan_and_preprocess:main",
        "diffnnunet_train=diffnnunet.cli.train:main",
        "diffnnunet_predict=diffnnunet.cli.predict:main",
        "diffnnunet_evaluate=diffnnunet.cli.evaluate:main",
        "diffnnunet_tune_sampling=diffnnunet.cli.tune_sampling:main",
        "diffnnunet_demo=diffnnunet.demo:main",
        "diffnnunet_find_best_configuration=diffnnunet.cli.find_best:main",
        "diffnnunet_ensemble=diffnnunet.cli.ensemble:main",
        "diffnnunet_apply_postprocessing=diffnnunet.cli.apply_postprocessing:main",
        "diffnnunet_export_model_to_zip=diffnnunet.cli.model_sharing:export_main",
        "diffnnunet_install_pretrained_model_from_zip=diffnnunet.cli.model_sharing:install_main",
    ]},
)
