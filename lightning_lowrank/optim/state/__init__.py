"""Where optimizer state lives and how it moves: full precision or 8-bit buffers, quantized P, integers read on the
host, each key's kind for the memory report, and a checkpoint loaded or converted under the current options.
"""
