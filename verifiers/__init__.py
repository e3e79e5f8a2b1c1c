"""Verifiers: decide which drafted tokens the target keeps."""

from specdec.verifiers.base import Acceptance, Verifier
from specdec.verifiers.greedy import GreedyVerifier, greedy_accept

__all__ = ["Acceptance", "Verifier", "GreedyVerifier", "greedy_accept"]


def make_verifier(model, *, temperature: float = 0.0, acceptance: str = "exact", **options) -> Verifier:
    """Pick the verifier for the sampling settings.

    temperature 0 with ``acceptance="exact"`` gives exact greedy acceptance.
    """
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if acceptance not in ("exact", "typical"):
        raise ValueError(f"acceptance must be 'exact' or 'typical', got {acceptance!r}")
    if options:
        raise ValueError(f"unknown generation options: {', '.join(sorted(options))}")
    if temperature == 0 and acceptance == "exact":
        return GreedyVerifier()
    raise NotImplementedError("sampling verifiers are not built yet")
