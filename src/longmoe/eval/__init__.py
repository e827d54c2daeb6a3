"""Long-context evaluation: needle in a haystack, RULER-style tasks and NLL by position, for local models or any
endpoint speaking the Gemini or OpenAI API."""
