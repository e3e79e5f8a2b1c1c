"""specdec: lossless speculative and parallel decoding.

Drafters propose a token tree, the target model verifies the whole tree in one
forward pass, and the engine keeps the longest accepted path::

    import specdec
    model, tokenizer = specdec.load_model("default")
    result = specdec.generate(model, tokenizer, "Fix the typos: ...", drafter="prompt-lookup")
    print(result.text, result.stats.mean_accepted_length)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("specdec")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+local"

from specdec.engine import GenerationResult, GenerationStats, generate, stream
from specdec.models import load_model
from specdec.tree import TokenTree

__all__ = ["generate", "stream", "load_model", "TokenTree", "GenerationResult", "GenerationStats", "__version__"]
