"""trtpipe: Hugging Face model -> validated, fast, served inference engine.

Heavy libraries (torch, onnxruntime, tensorrt, modelopt) are imported lazily inside the
functions that need them, so ``import trtpipe`` and ``trtpipe --help`` stay fast.
"""

__version__ = "0.1.0"
