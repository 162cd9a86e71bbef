"""zeromix node side: card registration, the per-rank actor and the training loop."""
