"""The deliberation engine: domain types, prompts and schemas, checks, and the engine with
its two ports (LLM, Executor). Pure application code shared by the orchestrator and the ray-executor."""
