"""Training LoRA adapters for an SDXL base: `python -m train` (see train/cli.py and train/loop.py)."""

import models  # noqa: F401 - before any diffusers import: see models.use_pil_image_processors
