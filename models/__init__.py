"""What a base and an adapter are, the model store, CLIP: shared by `train` and `service`.

Importing the package also settles which image processors transformers hands to diffusers
(`use_pil_image_processors`), before diffusers' SDXL pipeline asks for them.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

PIL_IMAGE_PROCESSORS = ("CLIPImageProcessor", "SiglipImageProcessor")
"""The image processors diffusers' SDXL pipeline and its loaders import from transformers by name."""
_ASKS_FOR_THEM = ("diffusers.pipelines", "diffusers.loaders.ip_adapter", "diffusers.loaders.single")


def use_pil_image_processors() -> None:
    """Make transformers' `CLIPImageProcessor` and `SiglipImageProcessor` its PIL processors.

    In transformers 5 those names mean the torchvision backends. torchvision is no dependency of
    this project (nothing here preprocesses images with them: SDXL has no image encoder and
    `models.clip` does its own preprocessing), so without this, every process that imports
    diffusers' SDXL pipeline makes transformers fall back to the PIL classes and warn about
    torchvision, on every run. Naming the PIL classes explicitly is the choice that warning asks
    for; where torchvision is installed, nothing changes.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return
    # Importing processing_utils runs transformers/__init__.py a second time, which puts a new
    # module object into sys.modules (direct_transformers_import): bind the names on that one.
    importlib.import_module("transformers.processing_utils")
    transformers = sys.modules["transformers"]
    for name in PIL_IMAGE_PROCESSORS:
        pil = getattr(transformers, f"{name}Pil", None)
        if pil is not None:  # a transformers without it keeps its own fallback
            setattr(transformers, name, pil)


class _BeforeDiffusersPipelines(importlib.abc.MetaPathFinder):
    """Calls `use_pil_image_processors` just before the first import of a diffusers module that
    asks for those names, so processes that never load a pipeline do not import transformers."""

    done = False

    def find_spec(self, fullname, path=None, target=None):
        if not self.done and fullname.startswith(_ASKS_FOR_THEM):
            self.done = True
            use_pil_image_processors()
        return None  # the usual finders import the module itself


if importlib.util.find_spec("torchvision") is None and not any(
    isinstance(finder, _BeforeDiffusersPipelines) for finder in sys.meta_path
):
    sys.meta_path.insert(0, _BeforeDiffusersPipelines())
