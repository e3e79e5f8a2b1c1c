"""Verifiers: decide which drafted tokens the target keeps."""

from specdec.verifiers.base import Acceptance, Verifier
from specdec.verifiers.greedy import GreedyVerifier, greedy_accept
from specdec.verifiers.sampling import SamplingConfig, SpeculativeSampler, TypicalVerifier, Warper

__all__ = [
    "Acceptance", "Verifier", "GreedyVerifier", "greedy_accept", "SamplingConfig", "SpeculativeSampler",
    "TypicalVerifier", "Warper", "make_verifier",
]



def make_verifier(
    model=None,
    *,
    temperature: float = 0.0,
    acceptance: str = "exact",
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    typical_epsilon: float = 0.09,
    typical_delta: float = 0.3,
    **unknown,
) -> Verifier:
    """Pick the verifier for the sampling settings.

    * temperature 0: exact greedy acceptance (typical acceptance at
      temperature 0 is greedy too, as in Medusa);
    * temperature > 0, ``acceptance="exact"``: lossless speculative sampling;
    * temperature > 0, ``acceptance="typical"``: Medusa's typical acceptance (lossy).
    """
    if unknown:
        raise ValueError(f"unknown generation options: {', '.join(sorted(unknown))}")
    if not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if acceptance not in ("exact", "typical"):
        raise ValueError(f"acceptance must be 'exact' or 'typical', got {acceptance!r}")
    if temperature == 0:
        if repetition_penalty not in (None, 1.0):
            raise ValueError("repetition_penalty is only supported with temperature > 0 for now")
        return GreedyVerifier()
    config = SamplingConfig(temperature=float(temperature), top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    if acceptance == "typical":
        return TypicalVerifier(config, epsilon=typical_epsilon, delta=typical_delta)
    return SpeculativeSampler(config)
