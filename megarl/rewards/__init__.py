"""Rewards: rule verifiers, user functions, remote endpoints and reward models."""
