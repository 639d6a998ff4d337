"""Gradient communication over torch.distributed: bucket plans, GradientSync, compression."""
