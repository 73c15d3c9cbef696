"""The network: a decoder-only Transformer whose token mixer is a plugin.

transformer  Transformer, its blocks and positional encodings
mixers/      one module per token-mixer family behind one registry (softmax, linear, deltanet, ...)
decoding     the generation fast path (pre-allocated state, one fused step per layer)
hooks        TransformerLens-style hook points and their names
weights      state dicts in and out (weights_only) and a model built from one
"""
