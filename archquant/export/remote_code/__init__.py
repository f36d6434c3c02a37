"""Model code copied into every export folder, so ``trust_remote_code=True`` loads it without archquant."""
