"""Where and how a process runs: the device and the matmul peak (hardware), DDP under torchrun
(distributed), the time breakdown of a run (timing), and the on-disk cache of data and peak (disk_cache)."""
