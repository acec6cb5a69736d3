"""Built-in chat prompts shared by the benchmarks (deterministic, varied lengths)."""
from __future__ import annotations

TOPICS = [
    "Explain how a hash map works and when its lookups degrade.",
    "Write a short poem about the sea at night.",
    "What are three differences between TCP and UDP?",
    "Summarize the plot of a detective story you invent, in five sentences.",
    "Give me a recipe for a simple vegetable soup.",
    "How do vaccines train the immune system?",
    "Write a Python function that checks whether a string is a palindrome.",
    "What should I pack for a three-day hiking trip?",
    "Describe the water cycle to a ten-year-old.",
    "List five tips for writing clear emails.",
    "Why is the sky blue? Answer briefly.",
    "Compare renting and buying a home.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "What is the difference between weather and climate?",
    "Explain recursion with an example.",
    "Plan a one-day tour of a city you like.",
]


def chat_prompts(count: int) -> list[list[dict[str, str]]]:
    """`count` single-turn conversations, cycling the topics with a numbered variation."""
    out = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        suffix = "" if i < len(TOPICS) else f" (variation {i // len(TOPICS)})"
        out.append([{"role": "user", "content": topic + suffix}])
    return out
