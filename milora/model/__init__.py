"""The model side: base identity and loading, prompt templates, tokenization, generation, NLL and answer scoring."""
