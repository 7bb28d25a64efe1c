"""The serving layer inside SGLang's HTTP process: request limits (memory API and OpenAI routes follow)."""
