"""The executor wing: the pool executor (`executor`), its engine slots (`slots`) and dispatch to them
(`dispatch`), the request/batch/pool state (`pool_state`), the planning adapter that turns observed
state into a planning problem (`planning`, the one latency source of `plan` and `serve`) and the
planner process (`planner_process`)."""
