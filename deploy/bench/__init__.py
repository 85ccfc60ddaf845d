"""Throughput benchmark of the GRPO loop against TRL's GRPOTrainer; run `python -m deploy.bench`."""
