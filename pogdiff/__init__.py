"""PoGDiff: Product-of-Gaussians fine-tuning of Stable Diffusion on imbalanced image-text data.

The method lives here as small, pure, tested functions; the scripts at the repository root
(`train_pogdiff.py`, `evaluate_pogdiff.py`, `pipeline_pogdiff.py`) are thin wrappers around them.
"""

__version__ = "0.1.0"

import logging as _logging


class _TorchvisionFallbackNotice(_logging.Filter):
    """Drops exactly transformers' notice that an image processor (CLIPImageProcessor, SiglipImageProcessor) falls
    back to its PIL implementation because torchvision is not installed.

    diffusers imports those processors for the safety checker and IP adapters, which PoGDiff never uses, and the
    project installs no torchvision on purpose (CONTRIBUTING), so every tool started with two alarming lines that
    asked for nothing to be done. Every other transformers message, this logger's included, still passes.
    """

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# transformers logs it through this logger (its `get_logger` is `logging.getLogger`); a filter attached before
# transformers is imported applies as well. The scripts import `pogdiff` before diffusers for this reason.
_logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackNotice())
