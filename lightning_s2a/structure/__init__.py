"""Structural activation modules (bias, prompt, side) and the surgery that applies them."""
