"""The few-shot task pool: BIG-bench JSON tasks converted to the engine's task format, few-shot sampling
and task splits."""
