"""Model loading: the TransformerLens adapter, random test models and the offline GPT-2 tokenizer."""
