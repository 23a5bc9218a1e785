"""Text generation with KV-cache decoder engines: greedy and sampling, batched, multi-device."""

from trtpipe.generation.generator import GenerationResult, GenerationRun, Generator
from trtpipe.generation.sampling import SamplingParams

__all__ = ["GenerationResult", "GenerationRun", "Generator", "SamplingParams"]
