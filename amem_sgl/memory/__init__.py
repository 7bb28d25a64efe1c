"""The memory layer: recall per namespace, the memory API, sessions, OpenAI `user` = namespace."""
