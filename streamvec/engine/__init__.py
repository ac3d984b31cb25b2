"""Running a lazy model under a memory budget: plan, schedule, jobs, sinks."""
