"""Multi-turn agentic RL: environments (``reset`` / ``step``, run isolated), tools and the parsers of
the tool calls models emit, and the episode loop that turns engine turns and observations into
token-exact trajectories (docs/architecture.md, "megarl/agents/")."""
