"""hpc_dualbatch: hybrid dual-batch and cyclic progressive learning on MPI + Horovod."""

from setuptools import find_packages, setup

setup(
    name="hpc_dualbatch",
    version="0.1.0",
    description="Hybrid dual-batch and cyclic progressive learning for image classifiers "
    "on MPI clusters: an asynchronous parameter server plus Horovod worker groups.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["hpc_dualbatch", "hpc_dualbatch.*"]),
    package_data={"hpc_dualbatch": ["configs/*.yaml", "configs/*.json"]},
    # Horovod is not listed: it must be built against the local torch and MPI
    # (scripts/setup_env.sh does that; see README "Installing").
    install_requires=[
        "torch>=2.1",
        "torchvision>=0.16",
        "numpy>=1.22",
        "h5py>=3.6",
        "mpi4py>=3.1",
        "pyyaml>=6.0",
        "pillow>=9.0",
    ],
    extras_require={
        # tensorboard in test too: the tests read the event files back with its reader
        "test": [
            "pytest>=7",
            "pytest-mpi>=0.6",
            "pytest-timeout>=2.1",
            "hypothesis>=6",
            "ruff>=0.4",
            "tensorboard>=2.10",
        ],
        "plot": ["matplotlib>=3.5"],
        "tensorboard": ["tensorboard>=2.10"],  # event files beside metrics.jsonl (metrics.tensorboard)
    },
    entry_points={"console_scripts": ["hpc-dualbatch=hpc_dualbatch.cli:main"]},
)
