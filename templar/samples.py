"""Sample conversations: the export tool's parity check, the demo and the tests all use these.

They cover what breaks templating in practice: several turns, a system prompt, non-ASCII text, heavy whitespace (which
some templates strip and others keep) and a long conversation (which may need truncation).
"""

from __future__ import annotations

SYSTEM = "You are a careful assistant. Answer briefly."


def _long_text(words: int) -> str:
    base = ("The reward model reads the whole conversation in its own format and scores the final answer. "
            "Numbers like 3.14159 and 2048, code like `x = f(y) + 1`, and punctuation!? all appear. ").split()
    return " ".join(base[i % len(base)] for i in range(words))


def sample_conversations(long_words: int = 600) -> dict[str, list[dict[str, str]]]:
    """Named conversations, each ending with the assistant turn being scored."""
    return {
        "single_turn": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ],
        "system_prompt": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Give me one tip for writing tests."},
            {"role": "assistant", "content": "Make each test fail for exactly one reason."},
        ],
        "multi_turn": [
            {"role": "user", "content": "I have 3 apples."},
            {"role": "assistant", "content": "Nice, three apples."},
            {"role": "user", "content": "I eat one. How many are left?"},
            {"role": "assistant", "content": "You have 2 apples left."},
            {"role": "user", "content": "And if I buy a dozen more?"},
            {"role": "assistant", "content": "Then you have 14 apples."},
        ],
        "unicode": [
            {"role": "user", "content": "Traduis « bonjour » en japonais et en arabe, s'il te plaît 🙏"},
            {"role": "assistant", "content": "日本語: こんにちは — العربية: مرحبا 👋 (Ελληνικά: γειά σου; emoji: 🧪🚀)"},  # noqa: E501
        ],
        "whitespace": [
            {"role": "user", "content": "   lots   of\tspace \n\n\n and trailing newlines \n\n"},
            {"role": "assistant", "content": "\n  Indented answer:\n\n    - item one  \n\t- item two\n\n  "},
        ],
        "long": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": "Summarise this: " + _long_text(long_words)},
            {"role": "assistant", "content": "Summary: " + _long_text(max(10, long_words // 6))},
        ],
    }


def without_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The same conversation for templates that reject a system role."""
    return [m for m in messages if m["role"] != "system"]
