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
