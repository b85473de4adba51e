"""What every stage shares about conversations: the example shape, the chat template, greedy answers and their
scores, and the general prompts. Below every stage: it imports none."""
