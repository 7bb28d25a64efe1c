"""The README's two set-up commands are the ones the project runs."""

from pathlib import Path

from tests.server import readme_serve_command

ROOT = Path(__file__).resolve().parents[1]


def test_readme_serve_command_installs_then_serves_the_default_config():
    assert readme_serve_command() == (
        "bash install/install.sh && python -m amem_sgl.launch_server --config configs/default.yaml")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- test-command -->" in ci and 'bash -c "$readme_test_command"' in ci
    readme = (ROOT / "README.md").read_text()
    assert "<!-- test-command -->\n```bash\nbash install/install.sh && python -m pytest\n```" in readme


def test_every_benchmark_the_readme_lists_runs_through_amem_bench():
    """The README's "Benchmarks" list names modules (`cost_curve [--quick]`, ...); `amem bench NAME`
    must know each one, spelled as listed, and the module must exist."""
    import importlib.util
    import re

    from amem_sgl.cli import BENCHES

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Benchmarks"):]
    section = section[: section.index("\n## ", 1)] if "\n## " in section[1:] else section
    names = re.findall(r"^\* `([a-z_.]+)[ `]", section, flags=re.M)
    names += re.findall(r"`(kernels\.[a-z_]+)", section)
    assert len(set(names)) >= 10, names
    for name in set(names):
        assert name in BENCHES, f"README lists benchmark {name!r}; amem bench does not know it"
        assert importlib.util.find_spec(BENCHES[name]) is not None, BENCHES[name]
