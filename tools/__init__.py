"""Tools a user runs next to the gateway: the latency profiler, the tiny-model writer, Gantt charts."""
