"""pagedserve scheduler: block tables, admission, batching, preemption. Never imports torch."""
