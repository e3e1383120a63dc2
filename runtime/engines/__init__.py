"""The engines wing: vLLM engine processes (`engine`), their /proc, prctl and signal helpers
(`procs`, standard library only), spare engine processes (`spares`, and their child `spare_child`),
the process-group guard (`guard`), the device pool (`devices`, the one resolver) and /dev/shm
records (`shm`)."""
