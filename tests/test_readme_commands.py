"""The README opens with exactly two commands (install + the demo, install + the tests), and CI
(`.ci/run`) runs the README's test command as written."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _opening_commands() -> list[str]:
    """The two one-line bash blocks right under the title, nothing else between them."""
    opening = re.match(r"# [^\n]+\n\s*```bash\n([^\n]+)\n```\s*```bash\n([^\n]+)\n```\n",
                       (ROOT / "README.md").read_text())
    assert opening, "README.md must open with its title and the two commands"
    return [opening.group(1).strip(), opening.group(2).strip()]


def test_the_readme_opens_with_the_demo_and_the_test_command():
    demo, tests = _opening_commands()
    assert "longlive generate " in demo and "--preset tiny" in demo
    assert "python -m pytest" in tests


def test_ci_runs_the_readme_test_command():
    _, tests = _opening_commands()
    pytest_command = tests.split("&&")[-1].strip()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    assert ci[-1] == pytest_command
