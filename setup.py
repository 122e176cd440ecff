"""ft_keras: FreeTickets (dynamic sparse training ensembles) for Keras 3."""

import os

from setuptools import find_packages, setup

_HERE = os.path.dirname(os.path.abspath(__file__))


def _version():
    with open(os.path.join(_HERE, "ft_keras", "version.py")) as f:
        scope = {}
        exec(f.read(), scope)  # pylint: disable=exec-used
        return scope["__version__"]


setup(
    name="ft_keras",
    version=_version(),
    description=(
        "FreeTickets for Keras 3: dynamic sparse training, EDST/DST ensembles "
        "and TF Serving export."
    ),
    long_description=open(os.path.join(_HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ft_keras", "ft_keras.*"]),
    python_requires=">=3.10,<3.14",
    install_requires=[
        "tensorflow>=2.16,<2.23",
        "keras>=3.5,<3.16",
        "tensorflow-datasets>=4.9,<5",
        "absl-py>=1.0,<3",
        "tensorboard>=2.16,<2.23",
        "numpy>=1.26,<3",
    ],
    extras_require={
        "test": ["pytest>=8,<10", "matplotlib>=3.7,<4"],
        "examples": ["matplotlib>=3.7,<4"],
        # bench/tfmot_baseline.py (section 3 of bench/step_overhead.py): Keras 2 and tfmot, run in
        # a subprocess with TF_USE_LEGACY_KERAS=1; ft_keras itself never imports them. Each
        # tf_keras release pins its TensorFlow minor version, so pip picks the one matching the
        # installed TensorFlow (tf_keras 2.21 for TensorFlow 2.21). tfmot 0.8 declares
        # absl-py~=1.2, which pip resolves inside ft_keras's absl-py range.
        "bench": ["tf_keras>=2.16,<2.23", "tensorflow-model-optimization>=0.8.1,<0.9"],
        # The documentation site (`make docs`): mkdocstrings reads the sources with griffe,
        # statically, so building it imports nothing from ft_keras.
        "docs": [
            "mkdocs>=1.6,<2",
            "mkdocs-material>=9.5,<10",
            "mkdocstrings[python]>=0.29,<2",
            "pymdown-extensions>=10,<14",
        ],
    },
    license="Apache-2.0",
    license_files=["LICENSE"],
)
