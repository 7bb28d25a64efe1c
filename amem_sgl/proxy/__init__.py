"""``amem proxy``: a drop-in HTTP proxy in front of an OpenAI- or Anthropic-compatible API that adds a
namespace's recalled memory (text) to each request, laid out so the provider's prompt cache serves the
repeated part. See docs/proxy.md."""
