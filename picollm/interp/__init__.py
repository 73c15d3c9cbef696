"""Interpretability that answers "which component computes the answer, and how?".

One concept per module, every activation read or replaced through the model's hook points:
  prompts        clean/corrupted prompt pairs per sequence family, and head-eliciting sequences
  patching       activation patching: normalised logit difference recovered per site
  logit_lens     each layer's residual stream decoded through the final norm and head
  probes         seeded ridge / logistic linear probes on residual-stream activations
  head_detector  TransformerLens-style `detect_head` scores (previous-token, k-back, first, induction)
  html_view      a self-contained interactive HTML page (attention per head, neuron family means)
  playground     the page's playground: embedded weights for its JavaScript forward pass (playground.js), the
                 one re-implementation of the forward pass, tested against the model (tests/test_playground.py)
  plots          the static figures of these sections
"""
