"""Preference tuning: pairs from stories or sequences (pairs), the DPO / SimPO / RPO losses and trainer
(trainer), and the per-scheme metrics with their paired bootstrap (metrics)."""
