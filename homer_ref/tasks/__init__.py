"""Tasks that exercise HOMER: passkey retrieval (`passkey.py`, the shipped model's task) and perplexity past the
trained context (`perplexity.py`, the official protocol and its baselines)."""
