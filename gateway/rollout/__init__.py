"""Staged rollouts of students: the policy (pure), the gateway's service and evaluator,
the admin endpoints and ``retort students rollout``."""
