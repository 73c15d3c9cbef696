"""Everything MLflow: the store and run lifecycle (store), its faults (faults), the run scaffold every flow
enters (runs), logged and registered models (registry, serving, prompts) and the team server (server)."""
