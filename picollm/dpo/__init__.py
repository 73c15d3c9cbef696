"""Preference tuning: pairs from stories or sequences (pairs), the DPO / SimPO / RPO losses and trainer
(trainer), the per-scheme metrics (metrics), the gain's bootstrap over stories and Holm across schemes (stats),
and a run's report and figure (report)."""
