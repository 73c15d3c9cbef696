"""The search behind `picollm sweep` (search); its config and ranges are picollm/config/sweep.py."""
