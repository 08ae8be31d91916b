"""The stages of a task's lifecycle: plan, split, delegate, verify and merge."""
