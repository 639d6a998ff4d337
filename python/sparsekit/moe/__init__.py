"""Mixture of Experts: routing plans, dispatch/combine, the MoE layer, load balancing."""
