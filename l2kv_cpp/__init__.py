"""l2kv-cpp: long-context llama.cpp inference with a KV cache bounded by eviction (key norm or KeyDiff).

Importing this package has no side effects: libllama is loaded (through llama-cpp-python) only
when a function that needs it is called (see l2kv_cpp._lib).
"""

__version__ = "0.1.0"
