"""An SGLang frontend program that uses amem memory through the server.

The program recalls notes from a namespace (amem's memory API, via the SDK), then runs an ordinary
``sgl.function`` against the same server. Run a server first (README), then:

    python examples/sgl_memory_program.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import sglang as sgl

from amem_sgl import Amem

NOTES = ["The staging database is called atlas-stage and lives in eu-west-1.",
         "Deploys to production need a green CI run and a review from the on-call engineer.",
         "The on-call engineer this week is Priya."]


@sgl.function
def answer_with_memory(s, question: str, notes: str):
    s += sgl.system("You answer questions about a software team. Use the notes.")
    s += sgl.user(f"Notes:\n{notes}\n\nQuestion: {question}")
    s += sgl.assistant(sgl.gen("answer", max_tokens=48, temperature=0))


def run(url: str, question: str = "Who is on call this week?", namespace: str = "team-notes") -> dict:
    memory = Amem(url)
    memory.remember(namespace, NOTES)
    recalled = memory.search(namespace, question, k=2)
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    state = answer_with_memory.run(question=question, notes="\n".join(c.text for c in recalled))
    return {"answer": state["answer"], "recalled": [c.text for c in recalled]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:30000")
    parser.add_argument("--question", default="Who is on call this week?")
    args = parser.parse_args()
    print(run(args.url, args.question))
