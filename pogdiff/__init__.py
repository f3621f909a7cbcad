"""PoGDiff: Product-of-Gaussians fine-tuning of Stable Diffusion on imbalanced image-text data.

The method lives here as small, pure, tested functions; the scripts at the repository root
(`train_pogdiff.py`, `evaluate_pogdiff.py`, `pipeline_pogdiff.py`) are thin wrappers around them.
"""

__version__ = "0.1.0"
