"""ufo-jax: one Vision Transformer for face, person, vehicle and product retrieval."""

import setuptools

# Tested ranges: the lower bound is the version the test suite runs on.
INSTALL_REQUIRES = [
    'jax>=0.10.2,<0.13',
    'flax>=0.12.8,<0.13',
    'optax>=0.2.8,<0.3',
    'orbax-checkpoint>=0.12.8,<0.13',
    'grain>=0.2.18,<0.3',
    'array-record>=0.8.6,<0.9',
    'tensorflow-datasets>=4.9.10,<4.10',
    'ml-collections>=1.1.0,<1.2',
    'clu>=0.0.12,<0.1',
    'tensorflow-cpu>=2.21,<2.22',
    'tensorboard>=2.21,<2.22',
    'numpy>=2.0,<3',
    'pillow>=11,<14',
    'safetensors>=0.8,<0.9',
    'matplotlib>=3.9,<4',
    'opencv-python-headless>=5.0,<6',
    'absl-py>=2.1',
]

EXTRAS_REQUIRE = {
    'dev': [
        'pytest>=9.0,<10',
        'pytest-xdist>=3.8,<4',
        'ruff>=0.17,<0.18',
        'pandas>=2.2,<4',  # tfds.as_dataframe (tests/test_data_prep.py)
        'jinja2>=3.1,<4',
    ],
    'beam': [
        'apache-beam>=2.77,<2.78',
    ],
    # libtpu (pinned by jax[tpu] to the jax version): --mode=aot compiles for TPU pod
    # topologies on any host; also what a TPU VM runs on. Part of the test install.
    'tpu': [
        'jax[tpu]==0.10.2',
    ],
    # ONNX export (python -m ufo_jax.export --formats=onnx). The converter itself is installed
    # apart, without its dependency pins (its orbax-checkpoint<0.11.37 pin conflicts with ours):
    #   pip install --no-deps jax2onnx==0.17.1        (`make install` does both)
    'onnx': [
        'onnx>=1.20.1,<1.24',
        'onnx-ir>=1.1,<1.2',
        'onnxruntime>=1.24.1,<1.32',
    ],
    # FAISS (faiss-cpu): the baseline of bench/search.py and the indexes of ufo_jax/index.py.
    # On a GPU host faiss-gpu can replace it (docs/EXPORT.md).
    'faiss': [
        'faiss-cpu>=1.15.1,<1.16',
    ],
}

setuptools.setup(
    name='ufo-jax',
    version='0.1.0',
    description='One JAX/Flax Vision Transformer for face recognition, person and vehicle '
                're-identification and product retrieval (UFO AllInOne).',
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=setuptools.find_packages(include=['ufo_jax', 'ufo_jax.*', 'data_prep', 'data_prep.*']),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    license='Apache-2.0',
)
