"""What every step stands on: files (local or remote), the device mesh and shardings,
several hosts, host-memory settings and shape buckets."""
