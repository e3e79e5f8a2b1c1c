"""Verifiers: decide which drafted tokens the target keeps."""

from specdec.verifiers.base import Acceptance, Verifier
from specdec.verifiers.greedy import GreedyVerifier, RelaxedGreedyVerifier, greedy_accept
from specdec.verifiers.sampling import KnowledgeTransferSampler, SamplingConfig, SpeculativeSampler, TypicalVerifier, Warper

__all__ = [
    "Acceptance", "Verifier", "GreedyVerifier", "RelaxedGreedyVerifier", "greedy_accept", "SamplingConfig", "SpeculativeSampler",
    "TypicalVerifier", "KnowledgeTransferSampler", "Warper", "make_verifier",
]


def make_verifier(config=None, **options) -> Verifier:
    """Pick the verifier for a :class:`~specdec.config.GenerationConfig` (or its fields as keywords).

    * temperature 0: exact greedy acceptance (typical acceptance at
      temperature 0 is greedy too, as in Medusa);
    * temperature > 0, ``acceptance="exact"``: lossless speculative sampling;
    * temperature > 0, ``acceptance="typical"``: Medusa's typical acceptance (lossy);
    * ``acceptance="gad"`` (temperature 0): GAD's relaxed top-β / τ verification (lossy);
    * ``acceptance="rapid"`` (temperature > 0): RAPID's knowledge transfer (lossy).
    """
    from specdec.config import GenerationConfig, options_into

    config = options_into(GenerationConfig, options, what="generation option", base=config or GenerationConfig())
    if config.acceptance == "gad":
        return RelaxedGreedyVerifier(config.gad_top_beta, config.gad_tau)
    if config.temperature == 0:
        return GreedyVerifier()
    sampling = SamplingConfig(temperature=float(config.temperature), top_k=config.top_k, top_p=config.top_p,
                              repetition_penalty=config.repetition_penalty)
    if config.acceptance == "typical":
        return TypicalVerifier(sampling, epsilon=config.typical_epsilon, delta=config.typical_delta)
    if config.acceptance == "rapid":
        return KnowledgeTransferSampler(sampling, strength=config.rapid_strength, threshold=config.rapid_threshold)
    return SpeculativeSampler(sampling)
