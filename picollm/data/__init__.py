"""What the models read: the synthetic families (generators, Bayes ceilings), their splits, padding and
batches (splits), the tokenizers of every model (tokenizers) and TinyStories (stories)."""
